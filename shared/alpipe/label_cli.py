"""Labeling from a terminal (`alpipe label`), and the download behind `alpipe export`.

The loop is the tutorial's interactive mode over the API: fetch the most informative samples
(leased to you), show each one with its score and the model's guess, read one key per sample:
a class key labels it (the same keys as the web page: 1-9 then 0 for the first ten classes; any
class can also be typed by name), `s` skips, `u` undoes your last label, `q` quits. Input and
output are injected (an input function, an output stream, an image viewer), so the loop runs the
same with a person at a TTY, with piped stdin, and under unit tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .api_client import ApiClient, ApiError
from .errors import UserError
from .schemas import COLD_START_PICK_FLOOR, REPRESENTATIVE_PICK_FLOOR

KEYS = "1234567890"
COMMANDS = {"s": "skip", "u": "undo", "q": "quit"}


EXPORT_SUFFIX = {"csv": ".csv", "json": ".json", "imagefolder": ".zip"}


def export_to_file(api: ApiClient, *, project: str, fmt: str, out: Path | None) -> tuple[Path, int]:
    """Download GET /projects/{project}/export?format=fmt to out (default <project>-labels.<ext>)."""
    if fmt not in EXPORT_SUFFIX:
        raise UserError(f"unknown export format {fmt!r}; choose from: {', '.join(EXPORT_SUFFIX)}")
    path = Path(out) if out else Path(f"{project}-labels{EXPORT_SUFFIX[fmt]}")
    size = api.download(f"/projects/{project}/export", path, params={"format": fmt})
    return path, size


# --- showing images ----------------------------------------------------------------------------------


def system_opener(platform: str, env: Mapping[str, str]) -> Callable[[Path], None] | None:
    """How to open an image file for a person to see: macOS `open`, or xdg-open (a browser) under a
    display; None on a terminal without one (the path is printed instead)."""
    if platform == "darwin":
        command = ["open"]
    elif env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        xdg = shutil.which("xdg-open")
        if xdg is None:
            import webbrowser

            return lambda path: webbrowser.open(path.resolve().as_uri())
        command = [xdg]
    else:
        return None

    def open_file(path: Path) -> None:
        subprocess.Popen([*command, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)

    return open_file


_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/bmp": ".bmp",
           "image/webp": ".webp", "image/tiff": ".tif"}


@dataclass
class ImageSaver:
    """Saves each image in folder and opens it with opener where there is one; returns what to print."""

    folder: Path
    opener: Callable[[Path], None] | None = None

    def show(self, sample_id: str, data: bytes, content_type: str) -> str:
        path = Path(self.folder) / f"{sample_id[:16]}{_SUFFIX.get(content_type.split(';')[0].strip(), '.img')}"
        path.write_bytes(data)
        if self.opener is not None:
            try:
                self.opener(path)
                return f"image: {path} (opened)"
            except OSError as e:
                return f"image: {path} (could not open a viewer: {e})"
        return f"image: {path}"


# --- the loop ----------------------------------------------------------------------------------------


def class_keys(classes: list[str]) -> dict[str, str]:
    """key -> class, as on the web page: 1..9 then 0 for the first ten classes, except that classes
    named by single digits are their own keys (pressing 3 labels "3", never the third class)."""
    if len(set(classes)) == len(classes) and all(c in KEYS for c in classes):
        return {c: c for c in classes}
    return {KEYS[i]: c for i, c in enumerate(classes[:len(KEYS)])}


@dataclass
class _Item:
    sample: dict
    lease_token: str | None
    ranking_version: int | None = None  # 0: the cold-start ranking (TypiClust's picks, then a seeded random order)


@dataclass
class LabelSession:
    """One person labeling one project until they quit or the pool is empty."""

    api: ApiClient
    project: str
    labeler: str | None = None  # None: the token's labeler, or default_labeler when the API has no auth
    default_labeler: str = "anonymous"
    batch: int = 10
    input_fn: Callable[[str], str] = input
    out: TextIO = field(default_factory=lambda: sys.stdout)
    images: ImageSaver | None = None
    labeled: int = 0
    skipped: int = 0
    undone: int = 0
    _history: list[tuple[dict, str]] = field(default_factory=list)  # (sample, label) labeled this session
    _keys: dict[str, str] = field(default_factory=dict)
    _classes: list[str] = field(default_factory=list)
    _strategy: str = ""

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # --- setup ---

    def _project_info(self) -> dict:
        return self.api.json("GET", f"/projects/{self.project}")

    def _whoami(self) -> None:
        """Settle the labeler name: with auth on it is the token's (GET /me), else --labeler or the default."""
        try:
            me = self.api.json("GET", "/me")
        except ApiError as e:
            if e.status != 404:  # an API from before access control has no /me
                raise
            me = None
        if me and me.get("auth"):
            if self.labeler and self.labeler != me["name"]:
                raise UserError(f"your token belongs to {me['name']!r}; you cannot label as {self.labeler!r} "
                                "(leave out --labeler)")
            self.labeler = me["name"]
        else:
            self.labeler = self.labeler or self.default_labeler

    def _key_line(self) -> str:
        keyed = "  ".join(f"{k} {c}" for k, c in self._keys.items())
        rest = self._classes[len(self._keys):]
        by_name = f"  (type the name: {', '.join(rest)})" if rest else ""
        return f"keys: {keyed}{by_name}  |  s skip  u undo  q quit"

    def _intro(self, info: dict) -> None:
        counts, model = info["counts"], info["model"]
        self.say(f"project {self.project!r}: {counts['labeled']} labeled, {counts['pool']} unlabeled, "
                 f"model v{model['version']}; labeling as {self.labeler!r}")
        self.say("classes:")
        for i, c in enumerate(self._classes):
            key = KEYS[i] if i < len(KEYS) else "-"
            self.say(f"  {key}  {c}")
        clashes = [c for c in self._classes if c in COMMANDS]
        if clashes:
            self.say(f"note: {', '.join(repr(c) for c in clashes)} is also a command; use the class's number")
        self.say(self._key_line())

    # --- one sample ---

    def resolve(self, text: str) -> str | None:
        """The class a typed key or name stands for, None when it is neither."""
        if text in self._keys:
            return self._keys[text]
        if text in self._classes:
            return text
        folded = [c for c in self._classes if c.casefold() == text.casefold()]
        return folded[0] if len(folded) == 1 else None

    def _show(self, item: _Item, position: str) -> None:
        sample = item.sample
        sid = sample["sample_id"]
        parts = [f"{position} sample {sid[:12]}"]
        score = sample.get("score")
        parts.append(f"score {score:.3f}" if isinstance(score, int | float) else "score -")
        if item.ranking_version == 0:
            typical = isinstance(score, int | float) and score > COLD_START_PICK_FLOOR
            parts.append("(cold start: typical image)" if typical else "(cold start: random order)")
        elif self._strategy == "auto" and isinstance(score, int | float) and score >= REPRESENTATIVE_PICK_FLOOR:
            parts.append("(representative of the uncertain)")
        guess = sample.get("guess")
        if guess:
            confidence = guess.get("confidence")
            pct = f" ({confidence:.0%})" if isinstance(confidence, int | float) else ""
            parts.append(f"model guess: {guess.get('label')}{pct}")
        self.say("")
        self.say("  ".join(parts))
        url = self.api.url(sample.get("image_url") or f"/projects/{self.project}/samples/{sid}/image")
        self.say(f"  {url}")
        if self.images is not None:
            try:
                response = self.api.request("GET", url[len(self.api.base_url):])
                self.say("  " + self.images.show(sid, response.content, response.headers.get("content-type", "")))
            except UserError as e:
                self.say(f"  (could not fetch the image: {e})")

    def _label(self, item: _Item, label: str) -> bool:
        body = {"labeler": self.labeler, "labels": [{"sample_id": item.sample["sample_id"], "label": label,
                                                     "lease_token": item.lease_token}]}
        try:
            result = self.api.json("POST", f"/projects/{self.project}/labels", json=body)
        except ApiError as e:
            if e.status in (404, 409, 422):  # gone, leased to someone else meanwhile, not accepted
                self.say(f"  could not label it: {e}")
                return False
            raise
        self._history.append((item.sample, label))
        self.labeled += 1
        info = self._project_info()
        self.say(f"  labeled {label!r}: {result['labeled']} labeled in the project, "
                 f"model v{info['model']['version']}")
        return True

    def _undo(self) -> _Item | None:
        """Withdraw this session's last label; the sample (and its new lease) to show again, or None."""
        if not self._history:
            self.say("  nothing to undo yet")
            return None
        sample, label = self._history[-1]
        sid = sample["sample_id"]
        path = f"/projects/{self.project}/labels/{sid}"
        try:
            result = self.api.json("DELETE", path, params={"labeler": self.labeler})
        except ApiError as e:
            # A route that is not there answers FastAPI's bare 404 "Not Found", or 405.
            if e.status == 405 or (e.status == 404 and e.args[0].endswith(": Not Found")):
                self.say(f"  undo is not available on this API (DELETE {path} answered {e.status}); "
                         f"the label {label!r} stays")
                return None
            self.say(f"  could not undo: {e}")
            return None
        self._history.pop()
        self.labeled -= 1
        self.undone += 1
        result = result if isinstance(result, dict) else {}
        after = f": {result['labeled']} labeled in the project" if "labeled" in result else ""
        self.say(f"  undid {label!r} on sample {sid[:12]}{after}; label it again")
        return _Item(sample, result.get("lease_token"))

    def _ask(self, item: _Item, position: str) -> tuple[str, _Item | None]:
        """Show one sample and act on keys until it is labeled, skipped or undone.

        Returns the outcome (labeled, failed, skip, undo, quit) and, for undo, the undone sample.
        """
        self._show(item, position)
        while True:
            try:
                text = self.input_fn("label> ").strip()
            except EOFError:
                return "quit", None
            if text in COMMANDS:
                command = COMMANDS[text]
                if command == "skip":
                    self.skipped += 1
                    self.say("  skipped")
                    return "skip", None
                if command == "quit":
                    return "quit", None
                undone = self._undo()
                if undone is not None:
                    return "undo", undone
                continue
            label = self.resolve(text)
            if label is None:
                shown = repr(text) if text else "an empty line"
                self.say(f"  {shown} is not a key. {self._key_line()}")
                continue
            return ("labeled" if self._label(item, label) else "failed"), None

    def _hand_back(self, items: list[_Item]) -> None:
        """Release the leases of samples this session was served but did not label, so other labelers
        get them now rather than when the leases expire. Best effort: they expire anyway."""
        by_token: dict[str, list[str]] = {}
        for item in items:
            if item.lease_token:
                by_token.setdefault(item.lease_token, []).append(item.sample["sample_id"])
        for token, ids in by_token.items():
            try:
                self.api.json("POST", f"/projects/{self.project}/leases/release",
                              json={"lease_token": token, "sample_ids": ids, "labeler": self.labeler})
            except UserError as e:  # an API error, or the API is gone
                self.say(f"  could not hand {len(ids)} leased samples back ({e}); "
                         "they return to the pool when their leases expire")

    def run(self) -> int:
        """Label until `q`, the end of input, or an empty pool; returns the labels kept this session."""
        self._whoami()
        info = self._project_info()
        self._classes = list(info["project"]["classes"])
        self._strategy = info["project"].get("strategy", "")
        self._keys = class_keys(self._classes)
        self._intro(info)
        queue: deque[_Item] = deque()
        passed: list[_Item] = []  # leased to us and not labeled: skipped, or shown when we quit
        shown = 0
        try:
            while True:
                if not queue:
                    answer = self.api.json("GET", f"/projects/{self.project}/queries",
                                           params={"n": self.batch, "labeler": self.labeler})
                    if not answer["samples"]:
                        self.say("\nnothing left to label: every pool sample is labeled or leased")
                        break
                    queue.extend(_Item(s, answer["lease_token"], answer.get("model_version"))
                                 for s in answer["samples"])
                item = queue.popleft()
                shown += 1
                outcome, undone = self._ask(item, f"[{shown}]")
                if outcome in ("quit", "skip"):
                    passed.append(item)
                if outcome == "quit":
                    break
                if undone is not None:
                    # The undone sample again (under the lease the undo gave back, if any), then this one.
                    queue.appendleft(item)
                    queue.appendleft(undone)
        finally:  # Ctrl-C too
            self._hand_back([*passed, *queue])
        info = self._project_info()
        self.say(f"\nthis session: {self.labeled} labeled, {self.skipped} skipped, {self.undone} undone; "
                 f"project {self.project!r}: {info['counts']['labeled']} labeled, model v{info['model']['version']}")
        return self.labeled
