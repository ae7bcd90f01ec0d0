"""Evaluation and calibration text, available offline.

No WikiText or C4 is reachable here, so the corpora come from Debian packages, fetched once with `apt-get download`
(no install, no root-only side effects beyond apt's cache) and cached as plain text:
- `handbook`: the Debian Administrator's Handbook, en-US, the `<div class="para">` blocks in reading order
  (~210k SmolLM2 tokens of modern expository prose): the WikiText-2-like main evaluation set;
- `austen`: Jane Austen's six novels from `r-cran-janeaustenr` (R serialized data, read here without R), ~927k
  tokens: the second evaluation set, and the default calibration source (it plays C4's role in GPTQ's setup).
Any UTF-8 text file path works too (e.g. a local WikiText-2 `wiki.test.raw`).

The split (documented in README): every corpus is a token stream; its last `CALIB_FRACTION` is the calibration
region. Calibration samples are drawn only from there; evaluation windows are the non-overlapping `seq_len` windows
from the start, and when the evaluated corpus is the one the model was calibrated on (always for `austen`) they stop
before the calibration region, so calibration and evaluation never share a token.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError
from agile_tvm.models import cache_dir

BUILTIN_CORPORA = ("handbook", "austen")
CALIB_FRACTION = 0.35
_AUSTEN_ORDER = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def load_text(corpus: str) -> str:
    """The text of a built-in corpus (fetched and cached on first use) or of a UTF-8 file."""
    if corpus in BUILTIN_CORPORA:
        path = cache_dir() / "corpora" / f"{corpus}.txt"
        if not path.is_file():
            text = {"handbook": _build_handbook, "austen": _build_austen}[corpus]()
            _atomic_write_text(path, text)
        return path.read_text(encoding="utf-8")
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise UserError(f"corpus '{corpus}' not found: use {' or '.join(BUILTIN_CORPORA)}, or a UTF-8 text file path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason}): convert it, e.g. with iconv") from err
    if not text.strip():
        raise UserError(f"corpus {path} is empty: give a file with text in it")
    return text


def token_stream(tokenizer, corpus: str):
    """The whole corpus as one LongTensor of token ids, cached per (corpus text, tokenizer)."""
    import torch

    if tokenizer is None:
        raise UserError("this model has no tokenizer: a corpus needs one (tiny test models take token ids directly)")
    text = load_text(corpus)
    key = hashlib.sha1(text.encode("utf-8") + _tokenizer_fingerprint(tokenizer)).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{Path(corpus).name}-{key}.npy"
    if path.is_file():
        ids = np.load(path, allow_pickle=False)
    else:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, ids, allow_pickle=False)
        os.replace(tmp, path)
    if ids.size == 0:
        raise UserError(f"corpus '{corpus}' tokenizes to no tokens: give a file with text in it")
    return torch.from_numpy(ids)


def calibration_start(n_tokens: int) -> int:
    """First token of the calibration region (the last CALIB_FRACTION of the stream)."""
    return int(n_tokens * (1.0 - CALIB_FRACTION))


def eval_windows(tokens, seq_len: int, max_windows: int | None = None, exclude_calibration: bool = False):
    """Non-overlapping [W, seq_len] windows from the start; before the calibration region if asked."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too short: perplexity needs at least 2 tokens a window")
    end = calibration_start(len(tokens)) if exclude_calibration else len(tokens)
    count = end // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: give a positive number of windows")
        count = min(count, max_windows)
    if count == 0:
        raise UserError(
            f"the corpus has {end} usable tokens, fewer than one window of --seq-len {seq_len}: "
            "use a shorter --seq-len or a longer corpus"
        )
    return tokens[: count * seq_len].reshape(count, seq_len)


def calibration_samples(tokenizer, n: int, seq_len: int, seed: int = 0, corpus: str = "austen"):
    """`n` random [seq_len] samples from the corpus's calibration region, reproducible by `seed`."""
    import torch

    if n < 1:
        raise UserError(f"--calib-samples {n}: give at least one calibration sample")
    tokens = token_stream(tokenizer, corpus)
    region = tokens[calibration_start(len(tokens)):]
    if len(region) <= seq_len:
        raise UserError(
            f"the calibration region of '{corpus}' has {len(region)} tokens, not enough for --calib-seq-len "
            f"{seq_len}: use a shorter length or a longer calibration corpus"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(region) - seq_len, (n,), generator=gen)
    return torch.stack([region[s: s + seq_len] for s in starts.tolist()])


def _tokenizer_fingerprint(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode("utf-8")
    return repr(sorted(tokenizer.get_vocab().items())[:1000]).encode("utf-8")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _extract_deb(package: str) -> Path:
    """`apt-get download` a package into the cache and unpack it with dpkg-deb (nothing is installed)."""
    dest = cache_dir() / "debs" / package
    if (dest / ".complete").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        def download():
            return subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)

        try:
            result = download()
            if result.returncode != 0:  # the package lists may be empty on a fresh machine
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
                result = download()
        except FileNotFoundError as err:
            raise UserError(
                f"apt-get is needed to fetch the '{package}' corpus; on a non-Debian system pass a text file path"
            ) from err
        debs = list(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise UserError(f"could not download Debian package '{package}' ({result.stderr.strip()[-200:]}); "
                            "check the package mirror, or pass a text file path as the corpus")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
    (dest / ".complete").touch()
    return dest


class _ParaText(HTMLParser):
    """Collects the text of each `<div class="para">` block (nested tags included)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self._depth = 0  # div depth inside the current para, 0 when outside
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag != "div":
            return
        if self._depth:
            self._depth += 1
        elif "para" in (dict(attrs).get("class") or "").split():
            self._depth = 1
            self._buf = []

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1
            if self._depth == 0:
                text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
                if text:
                    self.paras.append(text)

    def handle_data(self, data):
        if self._depth:
            self._buf.append(data)


def _build_handbook() -> str:
    root = _extract_deb("debian-handbook") / "usr/share/doc/debian-handbook/html/en-US"
    if not (root / "index.html").is_file():
        raise UserError(f"the debian-handbook package has no en-US HTML at {root}")
    order = []
    for href in re.findall(r'href="([^"#]+\.html)', (root / "index.html").read_text(encoding="utf-8")):
        if href not in order and (root / href).is_file():
            order.append(href)
    paras = []
    for name in order:
        parser = _ParaText()
        parser.feed((root / name).read_text(encoding="utf-8"))
        paras.extend(html.unescape(p) for p in parser.paras)
    return "\n\n".join(paras) + "\n"


def _build_austen() -> str:
    from agile_tvm import rdata

    data = _extract_deb("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    books = rdata.read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb")
    texts = []
    for name in _AUSTEN_ORDER:
        lines = books[name]
        texts.append("\n".join(line or "" for line in lines).strip())
    return "\n\n\n".join(texts) + "\n"
