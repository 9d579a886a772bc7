import re

from conftest import run_script


def test_bench_runs_the_real_code_and_prints_its_figures(tiny):
    result = run_script("bench.py", "--random_init=True", f"--model_id={tiny.model_dir}", "--device=cpu",
                        "--steps=2", "--warmup=1", "--batch_size=4", "--score_batch_size=8", "--max_review_tokens=64", "--invariance=16")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "random weights" in out and "synthetic Yelp-length reviews" in out
    assert re.search(r"dense torch.float32 matmul: [\d.e+-]+ TFLOP/s", out)
    shapes = re.search(r"^attention: (\w+) \(cuDNN off on CUDA\), batches padded to a multiple of 1; distinct padded "
                       r"shapes: train (\d) in 2 batches, score (\d) in 2 batches; a training epoch meets about (\d+) padded "
                       r"lengths in 5,000 batches$", out, re.M)
    assert shapes and shapes.group(1) in ("FLASH_ATTENTION", "MATH") and 1 <= int(shapes.group(2)) <= 2, out
    assert 10 < int(shapes.group(4)) <= 64  # reviews of 1 to 64 tokens in a fixed template: a new length nearly every batch
    for run in ("train", "train, primer position suffix", "train, straightforward loop", "score", "score, straightforward loop",
                "probe features, every layer"):
        assert re.search(rf"^\| {re.escape(run)} \| [\d,.]+ \| [\d,]+ \| \d+% \| [\d.]+ GB RSS \| [\d.e+-]+ \| [\d.]+% \|$", out, re.M), run
    assert re.search(r"^train: [\d.]+x the straightforward loop$", out, re.M)
    assert re.search(r"^score: [\d.]+x the straightforward loop$", out, re.M)
    assert re.search(r"^train, primer position suffix: [\d.]+x primer position system$", out, re.M)
    moved = re.search(r"^batch size 1 vs 8: 0 of 16 answers over the vocabulary and 0 between the labels change; "
                      r"logits move by at most ([\d.e+-]+) ", out, re.M)
    assert moved and float(moved.group(1)) < 1e-5
    assert "reference run (290,000 training samples, 38,000 test reviews) projected" in out
