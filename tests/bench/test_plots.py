from cellserve.bench.plots import plot_p99_vs_load


def test_plot_p99_vs_load_writes_a_png(tmp_path):
    path = tmp_path / "p99.png"
    rows = {"cellular": [(10.0, 12.0), (50.0, 20.0), (100.0, 80.0)],
            "ort": [(10.0, 15.0), (50.0, float("nan")), (100.0, 900.0)]}  # NaN: no ok requests
    plot_p99_vs_load(rows, slo_ms=100.0, path=path, title="lstm-512")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
