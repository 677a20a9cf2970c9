"""Tests for experiments/: best-of-n's bookkeeping on real samples, and one-line errors."""
import math

import pytest

from experiments import overoptimization, sycophancy


def test_best_of_n_keeps_the_proxys_favourite_and_the_kl_bound(tiny_sft, tiny_reward):
    a = overoptimization.parse_args(["--sft", tiny_sft, "--prompts", "6", "--max-n", "8",
                                     "--max-new-tokens", "8", "--device", "cpu"])
    points = overoptimization.best_of_n(a, tiny_reward)
    assert [p["n_or_update"] for p in points] == [1, 2, 4, 8]
    for p in points:
        assert p["kl"] == pytest.approx(math.log(p["n_or_update"]) - 1 + 1 / p["n_or_update"])
    # the best of the first n is among the first 2n: the proxy's mean never falls as n grows
    proxies = [p["proxy"] for p in points]
    assert proxies == sorted(proxies) and proxies[-1] > proxies[0]


@pytest.mark.parametrize("script,args,message", [
    (overoptimization, ["--max-n", "48"], "--max-n 48: use a power of 2"),
    (overoptimization, ["--sft", "nowhere"], "--sft nowhere: no finished SFT run there"),
    (sycophancy, ["--sft", "nowhere"], "--sft nowhere: no finished run there"),
])
def test_bad_input_gets_one_line(script, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(args + ["--out-dir", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
