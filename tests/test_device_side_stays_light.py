"""device_agent runs on a Pi with numpy, paho-mqtt, cryptography and one runtime: nothing more."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("edgekit", "click", "onnx", "skl2onnx", "sklearn", "scipy", "pandas")
ROOT = Path(__file__).resolve().parent.parent


def test_no_module_of_device_agent_imports_host_only_packages():
    offenders = []
    for path in (ROOT / "device_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_the_shared_formats_loads_no_runtime_or_host_package():
    code = (
        "import sys, device_agent.bundle, device_agent.profile, device_agent.schema, device_agent.signing, "
        "device_agent.cli, device_agent.runtimes;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN + ('onnxruntime', 'ai_edge_litert')!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
