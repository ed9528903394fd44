"""Pods (and NetworkAttachmentDefinitions) from a file: the no-cluster source.

The file holds Kubernetes objects as JSON or YAML: a list, a `kind: List` with
`items`, or several YAML documents. Objects of kind NetworkAttachmentDefinition
feed the networks, objects of kind Pod (or no kind) the pods; others are skipped.
The file is re-read when it changes (mtime, size or inode); a file that does not
parse leaves the previous content in place.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Mapping

import yaml

from collector.discovery import Store

log = logging.getLogger(__name__)

NAD_KIND = "NetworkAttachmentDefinition"
FEED = "pods-file"


class PodsFileError(ValueError):
    pass


def parse_objects(text: str) -> list[Mapping]:
    """Every object in a JSON or YAML document stream, `kind: List` flattened."""
    text = text.strip()
    if not text:
        return []
    try:
        docs = [json.loads(text)] if text[0] in "[{" else list(yaml.safe_load_all(text))
    except (ValueError, yaml.YAMLError) as err:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            raise PodsFileError(str(err)) from err
    out: list[Mapping] = []
    for doc in docs:
        _flatten(doc, out)
    return out


def _flatten(doc, out: list) -> None:
    if isinstance(doc, list):
        for item in doc:
            _flatten(item, out)
    elif isinstance(doc, Mapping):
        kind = doc.get("kind")
        if isinstance(doc.get("items"), list) and (
                "metadata" not in doc or isinstance(kind, str) and kind.endswith("List")):
            for item in doc.get("items") or []:
                _flatten(item, out)
        else:
            out.append(doc)


def split_kinds(objects: list[Mapping]) -> tuple[list[Mapping], list[Mapping]]:
    """(pods, NADs); objects of other kinds (e.g. IPPools for cluster mode) are not ours."""
    pods, nads = [], []
    for obj in objects:
        kind = obj.get("kind")
        if kind == NAD_KIND:
            nads.append(obj)
        elif kind in (None, "Pod"):
            pods.append(obj)
    return pods, nads


class ObjectsFile:
    """Polls a file and hands all its objects to `apply` whenever it changes."""

    def __init__(self, path: str, apply, interval: float = 1.0):
        self.path = path
        self.apply = apply
        self.interval = interval
        self._stamp: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load_once(self) -> bool:
        """Re-read the file if it changed; True when `apply` was called."""
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp is not None:
                log.warning("objects file %s: %s", self.path, err)
            self._stamp = None
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path, encoding="utf-8") as f:
                objects = parse_objects(f.read())
        except (OSError, PodsFileError, UnicodeDecodeError) as err:
            log.error("objects file %s does not parse, keeping the previous content: %s", self.path, err)
            self._stamp = stamp
            return False
        self._stamp = stamp
        self.apply(objects)
        return True

    def start(self) -> None:
        self.load_once()
        self._thread = threading.Thread(target=self._run, name="objects-file", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.load_once()
            except Exception:       # never let the poller die
                log.exception("objects file reload failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


class PodsFile(ObjectsFile):
    """Pods and NADs from a file, mirrored into the store."""

    def __init__(self, path: str, store: Store, interval: float = 1.0):
        super().__init__(path, self._apply, interval)
        self.store = store
        store.expect(FEED)

    def _apply(self, objects: list[Mapping]) -> None:
        pods, nads = split_kinds(objects)
        self.store.replace_networks(nads)
        self.store.replace_pods(pods)
        self.store.mark_ready(FEED)
        log.info("pods file %s: %d objects, %d networks", self.path, len(pods), len(nads))
