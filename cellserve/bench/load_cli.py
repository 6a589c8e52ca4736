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


def bench_load(args, parser) -> int:
    from tqdm import tqdm

    slos = tuple(args.slo_ms or [200.0])
    for flag, value in (("--slo-ms", min(slos)), ("--seconds", args.seconds), ("--start-rps", args.start_rps),
                        ("--max-rps", args.max_rps), ("--vocab", args.vocab)):
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.factor <= 1:
        parser.error(f"--factor must be above 1, got {args.factor}")
    if args.json_tensors and args.protocol == "grpc":
        parser.error("--json-tensors is for HTTP; gRPC tensors are always binary")
    sweep = Sweep(slos_ms=slos, rates=_rates(args.rates, parser), start_rps=args.start_rps, factor=args.factor,
                  max_rps=args.max_rps, seconds_per_rate=args.seconds, bursty=args.arrivals == "bursty",
                  vocab=args.vocab, seed=args.seed)
    fmt = RequestFormat(args.input, binary=not args.json_tensors, pad_to_buckets=args.pad_to_buckets,
                        deadline_ms=slos[0] if args.deadline else None, time_major=args.time_major)
    server = None
    address = args.url
    if address is None:
        from cellserve.server.launch import ServerProcess

        print(f"starting cellserve serve --model {args.model} ...")
        server = ServerProcess("--model", args.model, "--metrics-port", "-1")
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
