"""Pods (and NetworkAttachmentDefinitions) from a file: the no-cluster source.

The file holds Kubernetes objects as JSON or YAML: a list, a `kind: List` with
`items`, or several YAML documents. Objects of kind NetworkAttachmentDefinition
feed the networks; everything else with a metadata block is taken as a Pod.
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
    pods, nads = [], []
    for obj in objects:
        (nads if obj.get("kind") == NAD_KIND else pods).append(obj)
    return pods, nads


class PodsFile:
    """Polls a file and mirrors its content into the store."""

    def __init__(self, path: str, store: Store, interval: float = 1.0):
        self.path = path
        self.store = store
        self.interval = interval
        self._stamp: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.expect(FEED)

    def load_once(self) -> bool:
        """Re-read the file if it changed; True when the store was updated."""
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp is not None:
                log.warning("pods file %s: %s", self.path, err)
            self._stamp = None
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path, encoding="utf-8") as f:
                pods, nads = split_kinds(parse_objects(f.read()))
        except (OSError, PodsFileError, UnicodeDecodeError) as err:
            log.error("pods file %s does not parse, keeping the previous content: %s", self.path, err)
            self._stamp = stamp
            return False
        self._stamp = stamp
        self.store.replace_networks(nads)
        self.store.replace_pods(pods)
        self.store.mark_ready(FEED)
        log.info("pods file %s: %d objects, %d networks", self.path, len(pods), len(nads))
        return True

    def start(self) -> None:
        self.load_once()
        self._thread = threading.Thread(target=self._run, name="pods-file", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.load_once()
            except Exception:       # never let the poller die
                log.exception("pods file reload failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
