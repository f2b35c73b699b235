"""Stage command lines driven by a config preset, as `python -m retrieval.build --config ...`."""

from __future__ import annotations

from configs.loader import load_config
from recdata.ingest import IngestOptions, ingest
from recdata.layout import paths
from recdata.samples import SampleSet
from retrieval.build import main as build_main
from retrieval.embed_items import main as embed_main
from tests.conftest import shared_path


def test_build_and_embed_from_config(tmp_path, capsys):

    out = str(tmp_path)
    # Stage outputs are content-addressed: the CLIs and the pipeline find them through trainer.stages.paths.
    p = paths(load_config("tiny", [f"run.output_dir={out}", "retrieval.text_mode=recent"]))
    assert p.dataset.startswith(f"{out}/datasets/ml-100k-ctr/") and p.samples.startswith(f"{out}/samples/ml-100k-ctr/")
    ingest(
        "movielens", str(shared_path("data", "movielens-100k")), p.dataset, IngestOptions(num_shards=2, progress=False)
    )
    # SUBR needs item embeddings: without them the error says which command makes them.
    assert build_main(["--config", "tiny", f"run.output_dir={out}"]) == 2
    assert "python -m retrieval.embed_items --config tiny" in capsys.readouterr().err
    # Any model source is accepted now (hub id, s3://, pypi:; issue #12); the tiny preset's random model is built
    # by the run, so without --model the error names the pipeline command.
    assert embed_main(["--config", "tiny", f"run.output_dir={out}"]) == 2
    assert "--stages embed" in capsys.readouterr().err
    code = build_main(
        ["--config", "tiny", f"run.output_dir={out}", "retrieval.text_mode=recent", "retrieval.num_workers=1"]
    )
    assert code == 0, capsys.readouterr().err
    samples = SampleSet.open(p.samples)
    assert samples.options["k_text"] == 10 and samples.options["k_id"] == 60 and samples.options["min_history"] == 5
    assert samples.num_rows("test") > 0
