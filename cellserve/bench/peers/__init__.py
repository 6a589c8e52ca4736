"""The servers users would run instead of cellserve, each serving the same exported model.

`PEERS` maps a peer's name to the module that defines it; `load_peer(name)` imports it only
when asked, so a peer's launcher costs nothing to the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cellserve.bench.peers.base import Peer, PeerModel

# name -> "module:class"
PEERS = {
    "triton": "cellserve.bench.peers.triton:TritonPeer",
    "mlserver": "cellserve.bench.peers.mlserver:MLServerPeer",
    "ray-serve": "cellserve.bench.peers.ray_serve:RayServePeer",
    "torchserve": "cellserve.bench.peers.torchserve:TorchServePeer",
    "unbatched": "cellserve.bench.peers.unbatched:UnbatchedPeer",
}


def load_peer(name: str) -> Peer:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    module, cls = PEERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def export_model(zoo_name: str, directory: Path) -> PeerModel:
    """The zoo model's weights as the ONNX graph every peer serves (written once per directory)."""
    from cellserve.bench.ort_runners import export_classifier_onnx
    from cellserve.graph import zoo

    module = zoo.reference_module(zoo_name)
    path = Path(directory) / f"{zoo_name}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_classifier_onnx(module, path)
    return PeerModel(name=zoo_name, onnx_path=path, vocab=module.embedding.num_embeddings,
                     classes=module.head.out_features)
