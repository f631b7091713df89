"""Backend discovery (entry-point group local_llm.backends) and the llm plugin, run as real commands."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chat_model import make_chat_model
from upg_backend.llama import Llama
from upg_backend.plugin import ENTRY_POINT_GROUP, Backend, backend, discover

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("plugins"))


@pytest.fixture(scope="module")
def reference(model_path):
    return Llama(model_path, n_ctx=512, n_threads=1)


def fake_distribution(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """A throwaway installed distribution: a .dist-info folder and its modules, importable from root."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


def test_upg_backend_protocol(model_path, tmp_path):
    assert isinstance(backend, Backend)
    assert backend.name == "upg" and ".upg" in backend.file_types
    assert backend.can_load(model_path)
    (tmp_path / "fake.upg").write_bytes(b"GGUF" + bytes(60))
    assert not backend.can_load(tmp_path / "fake.upg")
    assert not backend.can_load(tmp_path / "missing.upg")
    with backend.create(model_path, n_ctx=64, n_threads=1) as llama:
        assert llama.n_ctx() == 64


def test_upg_is_registered_in_package_metadata():
    # needs upg-backend's pyproject.toml entry: [project.entry-points."local_llm.backends"] upg = "upg_backend.plugin:backend"
    found = {d.entry_point: d for d in discover()}
    assert "upg = upg_backend.plugin:backend" in found
    assert found["upg = upg_backend.plugin:backend"].backend is backend


def test_backends_command_lists_third_party_and_broken_plugins(tmp_path):
    fake_distribution(tmp_path, "other-backend", f"[{ENTRY_POINT_GROUP}]\nother = other_backend:backend\n", {
        "other_backend": "class B:\n    name = 'other'\n    file_types = ('.bin',)\n"
                         "    def can_load(self, path): return True\n"
                         "    def create(self, path, **kw): return None\nbackend = B()\n"})
    fake_distribution(tmp_path, "broken-backend", f"[{ENTRY_POINT_GROUP}]\nbroken = broken_backend:backend\n",
                      {"broken_backend": "raise ImportError('missing native library')\n"})
    fake_distribution(tmp_path, "odd-backend", f"[{ENTRY_POINT_GROUP}]\nodd = odd_backend:backend\n",
                      {"odd_backend": "backend = object()\n"})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "upg_backend.cli", "backends"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    lines = {line.split(" = ")[0]: line for line in out.splitlines()}
    assert "file types .bin" in lines["other"] and "[other-backend]" in lines["other"]
    assert "ERROR cannot load: ImportError: missing native library" in lines["broken"]
    assert "ERROR does not follow the backend protocol" in lines["odd"]


def run_llm(user_dir: Path, plugin_path: Path, *args: str) -> str:
    """Runs the real `llm` command with only this plugin loaded and a private user directory."""
    exe = shutil.which("llm")
    assert exe, "the llm command is not installed (pip install llm)"
    env = {**os.environ, "LLM_USER_PATH": str(user_dir), "LLM_LOAD_PLUGINS": "llm-upg",
           "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO / "plugins" / "llm-upg")])}
    result = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def llm_env(tmp_path_factory, model_path):
    """A private llm user dir with the plugin (a throwaway distribution of plugins/llm-upg) and the
    tiny model registered as upg/tiny."""
    root = tmp_path_factory.mktemp("llm")
    plugin = root / "site"
    fake_distribution(plugin, "llm-upg", "[llm]\nupg = llm_upg\n", {})
    user = root / "user"
    assert "registered upg/tiny" in run_llm(user, plugin, "upg", "register", str(model_path), "--name", "tiny")
    return user, plugin


def answer(reference: Llama, messages: list[dict[str, str]], max_tokens: int) -> str:
    return reference.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)["choices"][0]["message"]["content"]


def test_llm_lists_and_runs_the_model(llm_env, reference, model_path):
    assert f"upg/tiny: {model_path}" in run_llm(*llm_env, "upg", "models")
    assert "upg/tiny" in run_llm(*llm_env, "models", "list")
    out = run_llm(*llm_env, "-m", "upg/tiny", "Hello there", "-o", "temperature", "0", "-o", "max_tokens", "12")
    assert out.rstrip("\n") == answer(reference, [{"role": "user", "content": "Hello there"}], 12)


def test_llm_system_prompt_and_conversation(llm_env, reference):
    opts = ["-o", "temperature", "0", "-o", "max_tokens", "10"]
    first = run_llm(*llm_env, "-m", "upg/tiny", "-s", "You are terse.", "How are you?", *opts).rstrip("\n")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How are you?"}]
    assert first == answer(reference, messages, 10)
    second = run_llm(*llm_env, "-c", "And today?", *opts).rstrip("\n")
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And today?"}]
    assert second == answer(reference, messages, 10)


def test_llm_schema_and_bad_options(llm_env):
    # a random model rambles inside free strings: fields whose values end themselves finish in bounded tokens
    out = run_llm(*llm_env, "-m", "upg/tiny", "--schema", "ok bool, count int", "Count something",
                  "-o", "temperature", "0.7", "-o", "seed", "1", "-o", "max_tokens", "200")
    answer = json.loads(out)
    assert set(answer) == {"ok", "count"}
    assert isinstance(answer["ok"], bool) and type(answer["count"]) is int
    exe = shutil.which("llm")
    env = {**os.environ, "LLM_USER_PATH": str(llm_env[0]), "LLM_LOAD_PLUGINS": "llm-upg",
           "PYTHONPATH": os.pathsep.join([str(llm_env[1]), str(REPO / "plugins" / "llm-upg")])}
    bad = subprocess.run([exe, "-m", "upg/tiny", "hi", "-o", "temperature", "-1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "temperature" in bad.stderr
