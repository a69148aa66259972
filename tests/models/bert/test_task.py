"""DP fine-tuning of a small BERT on the built-in synthetic sentence task through the one training loop."""

from polymodal.cli import main
from polymodal.models.bert.task import CUES, SyntheticSentences
from polymodal.train.metrics import read_metrics


def test_sentences_hold_their_cue():
    from polymodal.core import random as pr
    data = SyntheticSentences(50, pr.key(0))
    for i in range(50):
        text, label = data[i]
        cues = CUES[data.labels[label]]
        assert sum(w in cues for w in text.split()) == 1, text
        assert data[i] == (text, label)  # item i is a function of the key


def test_dp_bert_classifier_trains_and_logs_epsilon(tmp_path, capsys):
    out = tmp_path / "dp"
    args = ["train", "bert-classifier", "--preset", "tiny", "--steps", "3", "--batch-size", "16", "--train-size", "128",
            "--eval-size", "30", "--no-progress", "--out", str(out)]
    assert main(args + ["--dp", "--noise-multiplier", "1.0"]) == 0
    recs = read_metrics(out)
    eps = [r["epsilon"] for r in recs if "loss" in r]
    assert len(eps) == 3 and eps == sorted(eps) and eps[0] > 0
    from polymodal.train.dp import epsilon
    assert abs(epsilon(1.0, 16 / 128, 3, 1e-5) - eps[-1]) < 1e-9  # the accountant's, recomputed independently
    assert main(args + ["--dp"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_bert_classifier_learns_without_dp(tmp_path):
    out = tmp_path / "plain"
    assert main(["train", "bert-classifier", "--preset", "tiny", "--steps", "60", "--batch-size", "32",
                 "--train-size", "512", "--eval-size", "90", "--lr", "3e-3", "--no-progress", "--out", str(out)]) == 0
    assert read_metrics(out)[-1]["eval/accuracy"] > 0.6  # chance is 1/3
