"""Firecracker's metrics stream, pure: lines out of bytes, lines summed into readings.

Firecracker writes one compact JSON object per ``\\n``-terminated line, in
writes of at most 1 KiB, so a reader sees lines in pieces. A line whose
write hit a full pipe leaves a prefix behind, and the next line follows it
on the same ``\\n`` (or only the newline was lost, and two whole objects
share it): each object is then the text from a ``{"utc_timestamp_ms":`` on
(reference section 1). Counters in a line are the deltas since the previous
flush, so every line is summed; gauges (``SharedStoreMetric``) are current
values, so the newest wins (section 4). Firecracker main's ``id`` and
``properties`` members are labels: cut out of the line, never summed.

Nothing here does I/O; :class:`MetricsAccumulator` is fed bytes and asked
for readings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final

import orjson

from cellos_probed.probes import _fc_sum

#: A line is about 6 KB; far more than any plausible device count needs.
MAX_LINE_BYTES: Final = 256 * 1024
#: Where a line begins; a torn line is retried from its last occurrence.
LINE_START: Final = b'{"utc_timestamp_ms":'
TIMESTAMP_KEY: Final = "utc_timestamp_ms"

#: Sections whose every field is a gauge.
_GAUGE_SECTIONS: Final = frozenset({"api_server", "latencies_us"})
#: Single gauge fields of otherwise-counter sections.
_GAUGE_FIELDS: Final = frozenset({("seccomp", "num_faults"), ("vmm", "panic_count")})
_AGG_GAUGES: Final = frozenset({"min_us", "max_us"})
_gauge_cache: dict[tuple[str, str], bool] = {}
_GAUGE_CACHE_LIMIT: Final = 100_000


def is_gauge(section: str, field: str, sub: str | None = None) -> bool:
    """Whether a leaf holds a current value (take the newest) rather than a delta (sum).

    ``sub`` is the key inside a ``*_agg`` object: its ``min_us``/``max_us``
    are lifetime values, its ``sum_us`` a delta.
    """
    if sub is not None:
        return sub in _AGG_GAUGES
    key = (section, field)
    cached = _gauge_cache.get(key)
    if cached is None:
        cached = _classify(section, field)
        if len(_gauge_cache) < _GAUGE_CACHE_LIMIT:  # ids are few; stay bounded regardless
            _gauge_cache[key] = cached
    return cached


def _classify(section: str, field: str) -> bool:
    if section in _GAUGE_SECTIONS or (section, field) in _GAUGE_FIELDS:
        return True
    if section == "signals":  # deadly-signal flags are 0/1 stores; sigpipe counts
        return field != "sigpipe"
    if section.startswith("vhost_user_"):
        return field.endswith("_time_us")
    return False


class LineSplitter:
    """Complete lines out of chunks, whatever the chunking; memory stays bounded.

    A line longer than ``max_line`` is cut and counted in ``oversize``: dropped
    up to its ``\\n``, or up to a line start (``{"utc_timestamp_ms":``) in it,
    from which a line goes on, so that a good line right after a runaway one
    (which a full pipe can leave without its newline) is still read.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = bytearray()
        #: inside a cut line: its last bytes skipped (a line start may span two chunks)
        self._skipped: bytes | None = None
        self.oversize = 0

    @property
    def pending_bytes(self) -> int:
        return len(self._partial)

    @property
    def cutting(self) -> bool:
        """Whether the stream is inside a cut line, its end not read yet."""
        return self._skipped is not None

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        if self._skipped is not None:
            rest = self._skip(data)
            if rest is None:
                return lines
            data = rest
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._partial:
                self._partial += data[start:end]
                line: bytes | None = bytes(self._partial)
                self._partial.clear()
            else:
                line = data[start:end]
            if line is not None and len(line) > self.max_line:
                line = self._cut(line)
            if line is not None:
                lines.append(line)
            start = end + 1
        if start < len(data):
            self._partial += data[start:]
            if len(self._partial) > self.max_line:
                whole = bytes(self._partial)
                self._partial.clear()
                rest = self._cut(whole)
                if rest is None:
                    self._skipped = whole[1 - len(LINE_START) :]
                else:
                    self._partial += rest
        return lines

    def _cut(self, line: bytes) -> bytes | None:
        """An oversize line counted; what of it to keep: from the first line start
        that leaves at most ``max_line`` bytes, or None."""
        self.oversize += 1
        start = line.find(LINE_START, len(line) - self.max_line)
        return None if start < 0 else line[start:]

    def _skip(self, data: bytes) -> bytes | None:
        """Inside a cut line: ``data`` from where a line goes on (a line start, or
        past the newline that ends the cut one, whichever comes first); None: still inside."""
        assert self._skipped is not None
        window = self._skipped + data
        newline = window.find(b"\n")
        start = window.find(LINE_START, 0, len(window) if newline < 0 else newline)
        if start >= 0:
            self._skipped = None
            return window[start:]
        if newline >= 0:
            self._skipped = None
            return window[newline + 1 :]
        self._skipped = window[1 - len(LINE_START) :]
        return None

    def discard_partial(self) -> bool:
        """Forget an unfinished line (the file under it was truncated); True if there was one."""
        had = bool(self._partial) or self._skipped is not None
        self._partial.clear()
        self._skipped = None
        return had


def parse_line(line: bytes) -> tuple[list[dict[str, Any]], bool]:
    """``(objects, torn)``: the line's whole objects, in order, and whether any of it was corrupt.

    A line is one object, or, when a write hit a full pipe, more than one:
    a lost line's prefix before the next object, or two whole objects when
    only the newline between them was lost. Each part from a
    ``{"utc_timestamp_ms":`` on is tried alone; what does not parse makes
    the line torn. Leading NUL bytes (the hole a truncated regular file
    leaves) are skipped; a blank line is ``([], False)``: nothing to count.
    """
    line = line.lstrip(b"\0")
    if not line.strip():
        return [], False
    found = _load(line)
    if found is not None:
        return [found], False
    objects: list[dict[str, Any]] = []
    start = line.find(LINE_START)
    torn = start != 0
    while start >= 0:
        end = line.find(LINE_START, start + 1)
        found = _load(line[start:] if end < 0 else line[start:end])
        if found is None:
            torn = True
        else:
            objects.append(found)
        start = end
    return objects, torn


def delta_text(line: bytes) -> bytes | None:
    """A whole line's JSON without its leading ``utc_timestamp_ms`` member, or None.

    A reading is most often one line (the flush it asked for), and then its
    delta is that line as Firecracker wrote it: cutting the timestamp out of
    the text costs a copy, serialising the parsed line again ~10 us a VM.
    Anything but Firecracker's own compact form (whitespace, another member
    first) is None: the caller serialises the parsed object instead.
    """
    line = line.lstrip(b"\0")
    if not line.startswith(LINE_START) or not line.endswith(b"}"):
        return None
    comma = line.find(b",", len(LINE_START))
    if comma < 0 or not line[len(LINE_START) : comma].isdigit():
        return None
    if line.find(LINE_START[1:], comma) >= 0:
        return None  # a second timestamp member: the parser kept the last one
    return b"{" + line[comma + 1 :]


def _load(text: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict) and isinstance(value.get(TIMESTAMP_KEY), int):
        return value
    return None


def line_timestamp(line: bytes) -> int | None:
    """A line's ``utc_timestamp_ms`` read from its text, if it is Firecracker's first member."""
    if not line.startswith(LINE_START):
        return None
    end = line.find(b",", len(LINE_START))
    digits = line[len(LINE_START) : end]
    return int(digits) if end > 0 and digits.isdigit() else None


#: What Firecracker main puts right after ``utc_timestamp_ms`` when ``PUT /metrics``
#: sets ``emit_id`` / ``properties`` (reference section 3): labels, not metrics.
LABEL_KEYS: Final = ("id", "properties")
_JSON_STRING = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_PAIR = _JSON_STRING + b":" + _JSON_STRING
_LABELS = re.compile(
    rb'\{"utc_timestamp_ms":-?[0-9]+,('
    + rb'(?:"id":' + _JSON_STRING + rb",)?"
    + rb'(?:"properties":\{(?:' + _PAIR + rb"(?:," + _PAIR + rb")*)?\},)?"
    + rb")"
)  # fmt: skip


def split_labels(line: bytes) -> tuple[bytes | None, bytes]:
    """``(labels, rest)``: a line's ``id``/``properties`` members as written (joined by
    their comma) and the line without them, or ``(None, line)``.

    Cut from the text, so that a line with them is summed by the same fast
    paths as one without (they are never summed). Only Firecracker's own
    compact form is cut; anything else is left to the parse, which takes
    them out of the parsed line (:func:`pop_labels`).
    """
    match = _LABELS.match(line)
    if match is None or match.end() == match.start(1):
        return None, line
    return line[match.start(1) : match.end() - 1], line[: match.start(1)] + line[match.end() :]


def pop_labels(found: dict[str, Any]) -> dict[str, Any] | None:
    """A parsed line's ``id``/``properties`` taken out of it (as they are), or None."""
    labels: dict[str, Any] = {key: found.pop(key) for key in LABEL_KEYS if key in found}
    return labels or None


def decode_labels(labels: bytes | dict[str, Any] | None) -> dict[str, Any] | None:
    """What a reading names of a line's labels: ``id`` if a string, ``properties`` if an
    object of strings; None if neither (a VMM's odd labels are left out, not an error)."""
    if type(labels) is bytes:
        try:
            labels = orjson.loads(b"{" + labels + b"}")
        except orjson.JSONDecodeError:
            return None
    if not isinstance(labels, dict):
        return None
    named: dict[str, Any] = {}
    ident = labels.get("id")
    if type(ident) is str:
        named["id"] = ident
    properties = labels.get("properties")
    if type(properties) is dict and all(type(value) is str for value in properties.values()):
        named["properties"] = properties
    return named or None


#: per section, each field's "is it a gauge" answer: one dict lookup per leaf on the hot path
_section_gauges: dict[str, dict[str, bool]] = {}

#: ``merge_into(total, new)``: a parsed line (or a sum of lines) ``new`` added into
#: ``total``, in place, in C (``_fc_sum.c``). Counters add; gauges and anything not an
#: int take ``new``'s value; ``utc_timestamp_ms`` is not summed; ``total`` takes copies
#: of the sections it lacks, so ``new`` is never changed by a later merge into it. The
#: gauge cache, ``is_gauge`` and the limits are bound here, once.
merge_into: Callable[[dict[str, Any], dict[str, Any]], None] = partial(
    _fc_sum.merge_into, _section_gauges, is_gauge, _AGG_GAUGES, _GAUGE_CACHE_LIMIT
)

#: ``add_text(layout, totals_text, line)``: a whole line added into totals kept as their
#: JSON, text to text, in C: the new text, the line's timestamp and its missed count, or
#: None when the line (or a sum) does not fit the text and :func:`merge_into` takes it.
#: The two are held to one Python reference (tests/fc_sum_reference.py).
add_text = _fc_sum.add_text

#: ``trim(text, sections)``: what a reading publishes of a delta or the totals, given as
#: orjson's compact JSON: no leaf whose value is 0 (a consumer reads an absent leaf as 0)
#: nor object left empty, only the top-level ``sections`` (None: all). Text to text in C:
#: parsing and serialising the sums again cost more than summing them.
trim = _fc_sum.trim


def text_layout(totals: dict[str, Any]) -> bytes | None:
    """Each integer leaf of ``totals`` in order, 1 a gauge and 0 a counter, for :func:`add_text`.

    None when ``totals`` holds what the text path does not sum: a section or
    agg object that is empty or not an object, or a leaf that is not an int.
    """
    flags = bytearray()
    for section, fields in totals.items():
        if type(fields) is not dict or not fields:
            return None
        for field, value in fields.items():
            if type(value) is int:
                flags.append(is_gauge(section, field))
            elif type(value) is dict and value and all(type(v) is int for v in value.values()):
                flags.extend(sub in _AGG_GAUGES for sub in value)
            else:
                return None
    return bytes(flags)


@dataclass(frozen=True, slots=True)
class MetricsReading:
    """What the lines read since the previous reading add up to.

    ``lines``: objects summed (recovered torn lines included); ``torn_lines``:
    corrupt lines, recovered or not; ``unparsed_lines``: corrupt lines nothing
    could be recovered from (oversize ones included); ``lost_lines``: lines
    Firecracker itself failed to write (its ``logger.missed_metrics_count``);
    ``labels``: the ``id`` and ``properties`` of the newest line that had them
    (:func:`decode_labels`), None if no line had them.
    """

    utc_timestamp_ms: int | None
    lines: int
    torn_lines: int
    unparsed_lines: int
    lost_lines: int
    #: dicts from take_reading, their JSON (bytes) from take_reading_json, whose
    #: ``totals`` are None when the reading does not publish them
    delta: Any
    totals: Any
    labels: dict[str, Any] | None


#: What orjson (and most consumers) can hold: 64-bit integers, signed or not.
SUM_CEILING: Final = 2**64 - 1
SUM_FLOOR: Final = -(2**63)


def dumps_saturated(tree: dict[str, Any]) -> bytes:
    """``tree`` as JSON; a sum beyond 64 bits (only a VMM gone wrong) at the limit.

    Firecracker's counters are 64-bit unsigned; a sum past what a 64-bit
    integer holds is reported at the ceiling (or floor) rather than refused.
    """
    try:
        return orjson.dumps(tree)
    except TypeError:
        return orjson.dumps(_saturate(tree))


def _saturate(node: Any) -> Any:
    if type(node) is dict:
        return {key: _saturate(value) for key, value in node.items()}
    if type(node) is int:
        return max(SUM_FLOOR, min(node, SUM_CEILING))
    return node


class MetricsAccumulator:
    """Every line of one VMM's metrics stream, summed since the reader began.

    Each line is added into the totals as it is read, and of the reading's
    own sum (its ``delta``) only the line's text is kept while it is one
    line (nearly always): holding each VMM's line as parsed objects until
    its answer came cost memory the heap then kept (docs/performance.md).

    From the first reading on, the totals themselves are kept as their JSON
    text, and a line shaped as they are is summed into them text to text
    (:func:`add_text`): each reading publishes the totals' text as it is,
    never walked as objects nor serialised again. Any other line (and a
    reading's delta of several lines) is parsed and summed as objects
    (:func:`merge_into`, exact Python ints); totals taken back as objects
    are made text again by the next reading.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._splitter = LineSplitter(max_line)
        #: the reading's sum, once it is more than one line (or a line without its text)
        self._pending: dict[str, Any] | None = None
        #: while the reading is one whole line: that line's text without its timestamp
        self._pending_text: bytes | None = None
        #: the reading's ``logger.missed_metrics_count`` while it is one line
        self._pending_missed = 0
        #: the totals as objects, unless they are kept as text (below)
        self._totals: dict[str, Any] = {}
        #: the totals as their JSON, summed text to text by :func:`add_text`, and
        #: each integer leaf's gauge flag (:func:`text_layout`); None: ``_totals`` holds them
        self._totals_text: bytes | None = None
        self._layout = b""
        self._newest_timestamp: int | None = None
        self._lines = 0
        self._torn = 0
        self._unparsed = 0
        self._oversize_seen = 0
        #: the reading's newest ``id``/``properties``: as written, or parsed (decode_labels)
        self._labels: bytes | dict[str, Any] | None = None
        #: the labels text last decoded, and what it decoded to (they rarely change)
        self._decoded: tuple[bytes, dict[str, Any] | None] = (b"", None)
        #: every record ended by ``\\n`` so far (usable or not): "did a line arrive?";
        #: a line cut for its length is not one (see ``oversize``)
        self.records = 0

    @property
    def oversize(self) -> int:
        """Lines cut for being longer than ``max_line``, since the reader began."""
        return self._splitter.oversize

    @property
    def cutting(self) -> bool:
        """Whether the stream is inside a line being cut, its end not read yet."""
        return self._splitter.cutting

    def feed(self, data: bytes) -> int:
        """Take a chunk of the stream; returns how many records it completed."""
        lines = self._splitter.feed(data)
        for line in lines:
            self.take_line(line)
        oversize = self._splitter.oversize - self._oversize_seen
        if oversize:
            self._oversize_seen = self._splitter.oversize
            self._torn += oversize
            self._unparsed += oversize
        return len(lines)

    def take_line(self, line: bytes, accept: Callable[[int], bool] | None = None) -> bool:
        """One record (without its ``\\n``) into the sums.

        ``accept``: take it only if it is one whole object whose timestamp
        ``accept`` approves; otherwise nothing changes and False is returned.
        """
        # a line shaped as the totals (nearly every line once the totals exist):
        # added from its text; anything else parsed and merged
        labels, body = split_labels(line.lstrip(b"\0"))
        if accept is not None:
            timestamp = line_timestamp(body)
            if timestamp is None or not accept(timestamp):
                return False
        if self._totals_text is not None:
            summed = add_text(self._layout, self._totals_text, body)
            if summed is not None:
                self._totals_text = summed[0]
                if self._lines == 0:
                    self._added(body, labels, summed[1], summed[2])
                else:  # a reading's further line: only its delta needs the objects (the
                    # totals stay text: all VMMs' 60 s timers firing together would turn
                    # every VM's totals into objects at once, a peak the heap keeps)
                    self.records += 1
                    self._add(orjson.loads(body), labels, totals_added=True)
                return True
        objects, torn = parse_line(body)
        whole = not torn and len(objects) == 1
        if accept is not None and not whole:
            return False
        if not objects and not torn:
            return True  # blank: a hole in a truncated file, nothing was written there
        self.records += 1
        self._torn += torn
        if not objects:
            self._unparsed += 1
        for found in objects:
            own = pop_labels(found)
            self._add(found, labels if whole and own is None else own)
        return True

    def _added(self, line: bytes, labels: bytes | None, timestamp: int, missed: int) -> None:
        """A reading's first line, whole, which :func:`add_text` added into the totals.

        The rest of what :meth:`_add` does with a first line: counted, its
        timestamp and its text (or, for a line :func:`delta_text` does not
        cut, its parse) kept as the reading's delta. A line add_text takes is
        orjson's own compact text, and so is the delta cut from it.
        """
        self.records += 1
        self._lines = 1
        self._newest_timestamp = timestamp
        if labels is not None:
            self._labels = labels
        text = delta_text(line)
        if text is not None:
            self._pending_text = text
            self._pending_missed = missed
        else:
            found = orjson.loads(line)
            del found[TIMESTAMP_KEY]
            self._pending = found

    def _add(
        self,
        found: dict[str, Any],
        labels: bytes | dict[str, Any] | None,
        *,
        totals_added: bool = False,
    ) -> None:
        """One parsed line (a fresh object: nobody else holds it, its labels out of it)
        into totals and reading.

        Its delta is kept as the object, never as the line's text: a line
        :func:`add_text` did not take may be in any JSON form (spaces, a key
        twice), and :func:`trim` is given orjson's own compact text only.
        """
        self._lines += 1
        self._newest_timestamp = found.pop(TIMESTAMP_KEY)
        if labels is not None:
            self._labels = labels
        if not totals_added:
            # totals take copies of the sections they lack: ``found`` stays unshared
            merge_into(self._dict_totals(), found)
        if self._lines == 1:
            self._pending = found
            return
        if self._pending is None:  # a second line: the reading becomes a sum of objects
            assert self._pending_text is not None
            self._pending = orjson.loads(self._pending_text)
            self._pending_text = None
        merge_into(self._pending, found)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held, read but not yet a record."""
        return self._splitter.pending_bytes

    def forget_partial(self) -> None:
        """Drop an unfinished line the reader will read again from its start."""
        self._splitter.discard_partial()

    def truncated(self) -> None:
        """The file was truncated under the reader: an unfinished line is torn."""
        if self._splitter.discard_partial():
            self._torn += 1
            self._unparsed += 1

    def take_reading(self) -> MetricsReading:
        """The sums since the previous call, and the totals (copies); counts start again."""
        reading = self._take()
        delta = reading.delta
        return replace(
            reading,
            delta=orjson.loads(delta if type(delta) is bytes else dumps_saturated(delta)),
            totals=orjson.loads(self._totals_json()),
        )

    def take_reading_json(
        self, *, with_totals: bool = True, sections: tuple[bytes, ...] | None = None
    ) -> MetricsReading:
        """As :meth:`take_reading`, with ``delta`` and ``totals`` as the JSON text a
        reading publishes (:func:`trim`): no zero leaves, only ``sections`` (each
        name as JSON writes it; None: all); ``totals`` None unless ``with_totals``.

        Serialised here, once, as the sums stand now: the totals go on being
        added to in place, and the event embeds the fragments as they are.
        """
        r = self._take()
        delta = r.delta
        # made text even when not published: lines are then summed into it as text
        totals = self._totals_json()
        # built directly: dataclasses.replace() cost more than the counts it copies
        return MetricsReading(
            r.utc_timestamp_ms,
            r.lines,
            r.torn_lines,
            r.unparsed_lines,
            r.lost_lines,
            trim(delta if type(delta) is bytes else dumps_saturated(delta), sections),
            trim(totals, sections) if with_totals else None,
            r.labels,
        )

    def _dict_totals(self) -> dict[str, Any]:
        """The totals as objects, taken back from their text if they were kept as text."""
        if self._totals_text is not None:
            self._totals = orjson.loads(self._totals_text)
            self._totals_text = None
        return self._totals

    def _totals_json(self) -> bytes:
        """The totals' JSON; from now on kept as that text if :func:`add_text` can sum it.

        Kept as text, a line is summed into them text to text, and they are
        not serialised again. A sum beyond 64 bits stays as objects, exact
        (reported at the limit, see dumps_saturated).
        """
        if self._totals_text is not None:
            return self._totals_text
        try:
            text = orjson.dumps(self._totals)
        except TypeError:
            return dumps_saturated(self._totals)
        layout = text_layout(self._totals)
        if layout is not None:
            self._totals_text, self._layout, self._totals = text, layout, {}
        return text

    def _take(self) -> MetricsReading:
        """The reading's counts and its delta (a line's text, or a dict); no totals."""
        delta: bytes | dict[str, Any]
        if self._pending_text is not None:
            delta, missed = self._pending_text, self._pending_missed
        else:
            delta = self._pending or {}
            missed = _missed(delta)
        reading = MetricsReading(
            self._newest_timestamp,
            self._lines,
            self._torn,
            self._unparsed,
            missed,
            delta,
            None,
            self._decode_labels(),
        )
        self._pending = self._pending_text = None
        self._labels = None
        self._lines = self._torn = self._unparsed = 0
        return reading

    def _decode_labels(self) -> dict[str, Any] | None:
        """The reading's labels as it names them; text decoded once while
        it stays the same (a VMM's labels never change while it runs)."""
        labels = self._labels
        if type(labels) is not bytes:
            return decode_labels(labels)
        if labels != self._decoded[0]:
            self._decoded = (labels, decode_labels(labels))
        return self._decoded[1]


def _missed(delta: dict[str, Any]) -> int:
    """Lines Firecracker failed to write, as a line (or a sum of lines) says."""
    logger = delta.get("logger")
    missed = logger.get("missed_metrics_count", 0) if isinstance(logger, dict) else 0
    return missed if type(missed) is int else 0
