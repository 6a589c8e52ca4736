"""The project's exceptions. The protocol edge maps each class to one status code."""


class CellserveError(Exception):
    """Base of every error cellserve raises on purpose."""


class InvalidInput(CellserveError):
    """A request's inputs do not fit the model (name, dtype, shape, value range)."""


class ModelLoadError(CellserveError):
    """A model file could not be turned into a runnable model."""


class UnsupportedOperator(ModelLoadError):
    """The model uses an operator (or an attribute of one) that cellserve cannot run.
    `feature`: what of a supported operator is not (an attribute, an input), named as such
    rather than the operator itself."""

    def __init__(self, op_type: str, node_name: str, detail: str = "", *, feature: str = ""):
        self.op_type, self.node_name = op_type, node_name
        if feature:
            msg = f"{op_type!r} node {node_name!r}: {feature} is not supported"
            super().__init__(f"{msg} ({detail})" if detail else msg)
            return
        msg = f"unsupported operator {op_type!r} (node {node_name!r})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class Rejected(CellserveError):
    """Refused at admission: the predicted finish time misses the deadline, or queues are full."""


class DeadlineMissed(CellserveError):
    """Dropped while running: the request can no longer finish before its deadline."""


class NotOnThisExecutor(CellserveError):
    """An executor was asked for work it does not do (beam search on one that does not). The
    engine checks the executor's capabilities at admission, so a request never gets here."""


class UnknownModel(CellserveError):
    """No model of that name (or version) is loaded."""
