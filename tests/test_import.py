"""Importing moecompile does no work beyond defining its names and registering its ops: installed (the README's
set-up), it leaves torch.compile's machinery (torch._dynamo, ~0.9 s to import) to torch.compile, which finds the
backend through the package's entry point."""
import subprocess
import sys
from importlib.metadata import distribution


def test_import_leaves_dynamo_unloaded():
    assert any(ep.group == "torch_dynamo_backends" for ep in distribution("moecompile").entry_points)
    script = ("import sys, moecompile, torch\n"
              "print('dynamo', 'torch._dynamo' in sys.modules)\n"
              "print('registered', torch.ops.moecompile.moe_forward is not None)\n"
              "print('backend', 'moecompile' in torch._dynamo.list_backends())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["dynamo False", "registered True", "backend True"], done.stdout
