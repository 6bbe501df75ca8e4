"""mesh/loop.py: uvloop when it imports; otherwise asyncio's loop and one warning that says why."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvloop

from mesh import loop


def test_uvloop_when_it_imports(monkeypatch, caplog):
    monkeypatch.setattr(loop, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="mesh.loop"):
        assert loop.loop_factory() is uvloop.new_event_loop
    assert caplog.records == []


class _BrokenUvloop:
    """A meta path finder standing for a broken uvloop build: importing it raises this ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "uvloop":
            raise ImportError("uvloop/loop.so: undefined symbol: uv_loop_fork")
        return None


def test_missing_uvloop_warns_once_with_the_import_error(monkeypatch, caplog):
    monkeypatch.setattr(loop, "_warned", False)
    monkeypatch.delitem(sys.modules, "uvloop")
    monkeypatch.setattr(sys, "meta_path", [_BrokenUvloop(), *sys.meta_path])
    with caplog.at_level(logging.WARNING, logger="mesh.loop"):
        assert loop.loop_factory() is asyncio.new_event_loop
        assert loop.loop_factory() is asyncio.new_event_loop  # warned once only
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "mesh.loop",
            "WARNING",
            "uvloop is not available (uvloop/loop.so: undefined symbol: uv_loop_fork); "
            "running on the asyncio event loop (slower)",
        )
    ]


def test_not_installed_names_the_module(monkeypatch, caplog):
    monkeypatch.setattr(loop, "_warned", False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what Python does for a module it must not import
    with caplog.at_level(logging.WARNING, logger="mesh.loop"):
        assert loop.loop_factory() is asyncio.new_event_loop
    assert [r.getMessage() for r in caplog.records] == [
        "uvloop is not available (import of uvloop halted; None in sys.modules); "
        "running on the asyncio event loop (slower)"
    ]


def test_run_falls_back_to_asyncio(monkeypatch):
    monkeypatch.setattr(loop, "_warned", True)
    monkeypatch.setitem(sys.modules, "uvloop", None)

    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop.run(main()).startswith("asyncio")
