"""Eval outputs are written atomically: a process killed mid-write leaves the previous file whole."""

import json
import signal
import subprocess
import sys
import textwrap

from sidrec import metrics

KILLED_MID_WRITE = textwrap.dedent("""
    import json, os, signal, sys
    from sidrec import metrics

    def dump_half_then_die(value, file, **kwargs):
        file.write(json.dumps(value)[:20])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    json.dump = dump_half_then_die
    metrics.write_predictions(sys.argv[1], [{"predict": ["<a_2><b_2><c_2>"] * 50}] * 100)
""")


def test_killed_write_leaves_the_previous_predictions_and_a_rerun_replaces_them(tmp_path):
    path = tmp_path / "eval_predictions.json"
    old = [{"predict": ["<a_1><b_1><c_1>"]}]
    metrics.write_predictions(path, old)
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path)])
    assert killed.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == old  # whole, and the old one
    new = [{"predict": ["<a_3><b_3><c_3>"]}]
    metrics.write_predictions(path, new)
    assert json.loads(path.read_text()) == new
