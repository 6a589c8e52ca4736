"""`cellserve bench load`: flags to a sweep, a report on screen and on disk."""

from __future__ import annotations

from cellserve.bench.load import LoadReport, Sweep, Target, generator_ceiling, sweep_rates, table, warm_up, write_report
from cellserve.bench.loadgen import RequestFormat


def _rates(text: str | None, parser) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        parser.error(f"--rates must be comma-separated numbers, got {text!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error(f"--rates must list positive requests/s, got {text!r}")
    return rates


def _features(text: str | None, parser) -> tuple[int, ...]:
    """--features SHAPE: sizes joined by x (80, 4x20), each a positive integer."""
    if text is None:
        return ()
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        parser.error(f"--features must be a feature row's shape, positive sizes joined by x (80, 4x20), got {text!r}")
    return shape


def _served_sequence(args, parser):
    """What a request of the model this command serves holds (bench/traces.sequence_input)."""
    from cellserve.bench.traces import sequence_input
    from cellserve.server.repository import load_model

    try:
        return sequence_input(load_model(args.model, args.model_repository))
    except ValueError as exc:
        parser.error(str(exc))


def bench_load(args, parser) -> int:
    from tqdm import tqdm

    slos = tuple(args.slo_ms or [200.0])
    for flag, value in (("--slo-ms", min(slos)), ("--seconds", args.seconds), ("--start-rps", args.start_rps),
                        ("--max-rps", args.max_rps), ("--vocab", args.vocab if args.vocab is not None else 1)):
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.url is not None and args.model_repository is not None:
        parser.error("--model-repository is for the server this command starts; with --url, the server is yours")
    if args.factor <= 1:
        parser.error(f"--factor must be above 1, got {args.factor}")
    if args.json_tensors and args.protocol == "grpc":
        parser.error("--json-tensors is for HTTP; gRPC tensors are always binary")
    features = _features(args.features, parser)
    if features and args.pad_to_buckets:
        parser.error("--pad-to-buckets pads token ids; it cannot be combined with --features")
    input_name, vocab, time_major, longest, states = args.input, args.vocab, args.time_major, None, ()
    if args.url is None:  # the model served here says what its requests are, where flags do not
        seq = _served_sequence(args, parser)
        input_name, time_major, longest = input_name or seq.name, time_major or seq.time_major, seq.longest
        states = seq.states if input_name == seq.name else ()
        if not features and args.vocab is None:
            vocab, features = seq.vocab, seq.features
    sweep = Sweep(slos_ms=slos, rates=_rates(args.rates, parser), start_rps=args.start_rps, factor=args.factor,
                  max_rps=args.max_rps, seconds_per_rate=args.seconds, bursty=args.arrivals == "bursty",
                  vocab=vocab or 10000, features=features, longest=longest, seed=args.seed)
    fmt = RequestFormat(input_name or "tokens", binary=not args.json_tensors, pad_to_buckets=args.pad_to_buckets,
                        deadline_ms=slos[0] if args.deadline else None, time_major=time_major, states=states)
    server = None
    address = args.url
    if address is None:
        from cellserve.server.launch import ServerProcess, serve_model_args

        source = serve_model_args(args.model, args.model_repository)
        print(f"starting cellserve serve {' '.join(source)} ...")
        server = ServerProcess(*source, "--metrics-port", "-1")
        address = server.http if args.protocol == "http" else server.grpc
    try:
        target = Target(address, args.model, args.protocol, fmt)
        warm_up(target, sweep)
        with tqdm(total=len(sweep.rates) if sweep.rates else None, desc="bench load", unit="rate") as bar:
            rows = sweep_rates(target, sweep, bar)
    finally:
        if server is not None:
            server.stop()
    ceiling = generator_ceiling(args.protocol) if args.ceiling else None
    report = LoadReport(target, sweep, rows, ceiling)
    write_report(report, args.json, args.plot)
    print(table(report))
    print(f"wrote {args.json} and {args.plot or args.json.with_suffix('.png')}")
    return 0
