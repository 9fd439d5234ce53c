"""benchmarks/lm_eval: lm-eval through the server (`local-completions`, the documented command)
agrees with lm-eval's own `hf` + `peft` model, for a prompt-tuning and a P-tuning adapter.

lm-eval lives in an environment of its own (benchmarks/lm_eval/README.md). The end-to-end check
runs with the first Python that imports lm_eval among $LM_EVAL_PYTHON, ~/lmeval-venv,
an `lmeval-venv` beside the checkout and this interpreter; it skips only when none does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lm_eval import run as lm_run
from benchmarks.lm_eval.agreement import compare
from server.engine.byte_tokenizer import make_byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def lm_eval_python() -> str | None:
    candidates = [os.environ.get("LM_EVAL_PYTHON"),
                  str(Path.home() / "lmeval-venv" / "bin" / "python"),
                  str(ROOT.parent / "lmeval-venv" / "bin" / "python"), sys.executable]
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run(
                [python, "-c", "import lm_eval"], capture_output=True).returncode == 0:
            return python
    return None


def test_compare_finds_the_largest_loglikelihood_difference_and_differing_generations():
    server = {"mc": {0: [[["-1.0", "False"]], [["-2.5", "True"]]]},
              "gen": {0: [["12"]], 1: [["7"]]}}
    hf = {"mc": {0: [[["-1.00002", "False"]], [["-2.0", "True"]]]},
          "gen": {0: [["12"]], 1: [["71"]]}}
    c = compare(server, hf)
    assert c["loglikelihoods"] == 2 and c["max_loglikelihood_diff"] == pytest.approx(0.5)
    assert (c["generations"], c["identical_generations"]) == (2, 1)
    with pytest.raises(RuntimeError, match="different documents"):
        compare(server, {**hf, "gen": {0: [["12"]]}})


def test_the_python_behind_lm_eval_is_read_from_the_console_script(tmp_path):
    script = tmp_path / "lm_eval"
    script.write_text("#!/opt/lmeval/bin/python3.11\nimport sys\n")
    script.chmod(0o755)
    assert lm_run.lm_eval_python(str(script)) == ["/opt/lmeval/bin/python3.11"]
    assert lm_run.lm_eval_python("/opt/py/bin/python -m lm_eval") == ["/opt/py/bin/python"]


def test_add_bos_token_follows_the_tokenizer(tmp_path, capsys):
    causal, seq2seq = tmp_path / "causal", tmp_path / "seq2seq"
    make_byte_tokenizer().save_pretrained(causal)  # prepends <s>
    make_byte_tokenizer(seq2seq=True).save_pretrained(seq2seq)  # appends </s>, no BOS
    python = f"{sys.executable} -m lm_eval"  # only its Python is used: transformers is here
    assert lm_run.bos_model_args(python, str(causal), "") == ["add_bos_token=True"]
    assert lm_run.bos_model_args(python, str(seq2seq), "") == []
    assert lm_run.bos_model_args(python, str(causal), "add_bos_token=False") == []
    out = capsys.readouterr().out
    assert "prepends '<s>'" in out and "as given in --model-args" in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lm_eval_through_the_server_agrees_with_lm_eval_hf_peft(tmp_path):
    python = lm_eval_python()
    if python is None:
        pytest.skip("lm-eval is not installed (see benchmarks/lm_eval/README.md; "
                    "$LM_EVAL_PYTHON names its Python)")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/lm_eval/agreement.py"),
         "--lm-eval", f"{python} -m lm_eval", "--server-cmd", f"{sys.executable} -m server",
         "--limit", "4", "--json", str(report_path)],
        capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert [a["peft_type"] for a in report["adapters"]] == ["PROMPT_TUNING", "P_TUNING"]
    for a in report["adapters"]:
        # builtin:tiny's tokenizer prepends <s>, so run.py's command adds the flag.
        assert a["server_model_args"] == "add_bos_token=True"
        c = a["comparison"]
        assert c["loglikelihoods"] == 4 * 2  # four documents, two choices each
        assert c["max_loglikelihood_diff"] <= 1e-4
        assert c["generations"] == c["identical_generations"] == 4
        assert a["scores"]["server"] == a["scores"]["hf"]
        assert set(a["scores"]["server"]) == {"softprompt_sentiment", "softprompt_arithmetic"}
    assert "largest difference" in proc.stdout and "4/4 identical" in proc.stdout
