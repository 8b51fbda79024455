"""The demo path and training make no network connection: any socket connect or DNS lookup fails the run."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    socket.gethostbyname = refuse

    from ultralytics_qat.cli import main
    code = main(["train", "data={data}", "epochs=1", "imgsz=64", "batch=4", "nbs=4", "workers=0",
                 "project={project}", "name=h", "plots=False"])
    print("ATTEMPTS", len(attempts), attempts[:3])
    sys.exit(code or (3 if attempts else 0))
    """
)


def test_training_makes_no_network_calls(coco8, tmp_path):
    env_script = SCRIPT.format(data=coco8, project=tmp_path)
    import os

    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}  # a fresh config dir: first-run paths included
    env.pop("YOLO_OFFLINE", None)
    env["YOLO_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-c", env_script], capture_output=True, text=True, env=env, timeout=600)
    assert "ATTEMPTS 0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "h" / "weights" / "best.pt").exists()
