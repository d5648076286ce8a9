"""What every synthetic world shares: its arguments, the ``world.json`` marker and the atomic write to disk.

A world is a seeded generator of media with captions and ground-truth facts. :class:`SyntheticWorld` writes one
into a temporary sibling directory, last of all its ``world.json`` marker (its arguments, a format ``version``
and its ``kind``), and renames that directory into place, so an interrupted write never looks complete and a
root made with other arguments is refused instead of silently reused. Subclasses say what goes
inside (:meth:`SyntheticWorld._write_into`) and how many phrasings of each scene the text corpus lists in a row.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from vlgen.errors import ConfigError


class SyntheticWorld(ABC):
    """Base of the synthetic worlds: subclasses set ``kind``, ``version`` and ``args`` and fill a directory.

    ``world.json`` holds ``{**args, "version": version, "kind": kind}``. Markers written before ``kind`` was
    recorded lack it; they are matched on arguments and version alone.
    """

    kind: ClassVar[str]  # names the world in world.json and in error messages, e.g. "shapes"
    version: ClassVar[int]  # bump when a seed starts producing a different world
    args: dict[str, Any]  # the constructor's arguments: everything the world's content follows from

    @property
    @abstractmethod
    def captions_per_scene(self) -> int:
        """Phrasings per scene (image or video); ``corpus.txt`` lists each scene's phrasings on consecutive lines."""

    @abstractmethod
    def _write_into(self, out: Path) -> None:
        """Write every file of the world except ``world.json`` into the empty directory ``out``."""

    def marker(self) -> dict[str, Any]:
        """The content of ``world.json``."""
        return {**self.args, "version": self.version, "kind": self.kind}

    def is_written(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete world made with these arguments; raises if made with others."""
        path = Path(root) / "world.json"
        if not path.is_file():
            return False
        found = json.loads(path.read_text())
        kind = found.get("kind", self.kind)
        if kind != self.kind:
            raise ConfigError(f"{root} holds a {kind} world, not a {self.kind} world; delete it or use another root")
        if found.get("version") != self.version:
            raise ConfigError(f"{root} holds a {self.kind} world of another format; delete it to write the current one")
        wanted = {**self.args, "version": self.version}
        found = {k: v for k, v in found.items() if k != "kind"}
        if found != wanted:
            diff = ", ".join(f"{k}={found.get(k)} (wanted {v})" for k, v in wanted.items() if found.get(k) != v)
            raise ConfigError(
                f"{root} holds a {self.kind} world made with other arguments: {diff}; delete it or use another root"
            )
        return True

    def write(self, root: str | Path) -> Path:
        """Write the world into ``root`` (a no-op when it is already there) and return ``root``.

        Everything is written into a temporary sibling directory that is renamed to ``root`` at the end, so an
        interrupted write never leaves a world that looks complete (``world.json`` is what marks one).
        """
        root = Path(root)
        if self.is_written(root):
            return root
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ConfigError(f"{root} exists but holds no complete {self.kind} world; delete it or use another root")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
        try:
            self._write_into(tmp)
            (tmp / "world.json").write_text(json.dumps(self.marker(), indent=1))
            if root.exists():
                root.rmdir()  # an empty directory, e.g. made by the user
            os.rename(tmp, root)
        except OSError:
            if not self.is_written(root):  # unless another process finished the same world first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return root

    @staticmethod
    def _write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
        """A JSON list with one record per line."""
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")

    def _write_corpus(self, path: Path, phrasings: Callable[[int], list[str]]) -> None:
        """``num_text`` lines: the phrasings of unseen scenes 0, 1, 2, ..., each scene's on consecutive lines."""
        lines: list[str] = []
        for index in itertools.count():
            if len(lines) >= self.args["num_text"]:
                break
            lines += phrasings(index)
        path.write_text("".join(f"{line}\n" for line in lines[: self.args["num_text"]]))
