/*
 * cellos_probed.probes._fc_sum: Firecracker metrics lines summed in C.
 *
 *     add_text(layout, totals, line) -> (new_totals, utc_timestamp_ms, missed) | None
 *     merge_into(gauge_cache, is_gauge, agg_gauges, cache_limit, total, new) -> None
 *     trim(text, sections) -> bytes
 *
 * add_text adds a line into totals kept as their compact JSON text, text to
 * text: the path of nearly every line. merge_into adds a parsed line (or a
 * sum of lines) into a total of objects, in place: a reading's delta of more
 * than one line, and any line add_text refuses. trim makes what a reading
 * publishes of a delta or the totals, text to text: no zero leaves, only the
 * sections asked for. tests/test_fc_sum.py holds them to the Python reference,
 * tests/fc_sum_reference.py (add_text: the reference on the parsed totals and
 * line, serialised; trim: its reference on the parsed text, serialised).
 *
 * Built against the limited API (the stable ABI): nothing here can read
 * CPython-internal fields, and one build serves every CPython from 3.11 on.
 *
 * merge_into's first four arguments are the Python side's configuration,
 * passed in so that nothing here imports anything or keeps state;
 * fc_metrics_parse binds them once with functools.partial:
 *
 *   gauge_cache  dict: section -> {field: is_gauge answer} (_section_gauges),
 *                filled here exactly as the reference fills it
 *   is_gauge     callable(section, field), called on a cache miss
 *   agg_gauges   container of the sub keys of *_agg objects that are gauges
 *   cache_limit  int: a new section's answers are cached only while the
 *                cache has fewer sections than this
 *   total, new   exact dicts (TypeError otherwise); total is changed, new not
 *
 * It takes the reference's steps in the reference's order, with the same
 * exact type checks (a bool or an int subclass is "anything else"), Python
 * int addition, and the same exceptions (an error from is_gauge, a key's
 * __eq__, or a dict changing size under its iteration propagates, what was
 * merged before it left merged). Every key and value taken from a dict is
 * borrowed, so it is held across anything that may run Python code.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* "utc_timestamp_ms", made once at import */
static PyObject *timestamp_key;

/* TypeError "<what> must be <expected>, not <obj's type>"; returns NULL */
static PyObject *
wrong_type(const char *what, const char *expected, PyObject *obj)
{
    PyObject *name = PyType_GetName(Py_TYPE(obj));
    if (name != NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, not %U", what, expected, name);
        Py_DECREF(name);
    }
    return NULL;
}

/* ---- merge_into: objects ------------------------------------------------------------ */

typedef struct {
    PyObject *gauge_cache; /* exact dict */
    PyObject *is_gauge;
    PyObject *agg_gauges;
    long long cache_limit;
} Config;

static int
size_changed(void)
{
    PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
    return -1;
}

/* gauges.get(field), or is_gauge(section, field) stored into gauges[field]:
 * 1 gauge, 0 counter, -1 error */
static int
gauge_of(const Config *cfg, PyObject *gauges, PyObject *section, PyObject *field)
{
    if (!PyDict_CheckExact(gauges)) {
        wrong_type("a gauge cache entry", "a dict", gauges);
        return -1;
    }
    PyObject *answer = PyDict_GetItemWithError(gauges, field); /* borrowed */
    if (answer == Py_True || answer == Py_False) {
        return answer == Py_True;
    }
    if (answer != NULL && answer != Py_None) {
        Py_INCREF(answer); /* its __bool__ may run anything */
    }
    else {
        if (answer == NULL && PyErr_Occurred()) {
            return -1;
        }
        answer = PyObject_CallFunctionObjArgs(cfg->is_gauge, section, field, NULL);
        if (answer == NULL) {
            return -1;
        }
        if (PyDict_SetItem(gauges, field, answer) < 0) {
            Py_DECREF(answer);
            return -1;
        }
    }
    int truth = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return truth;
}

/* before[sub] = earlier + number (counters) or number, for each sub of an *_agg object */
static int
merge_agg(const Config *cfg, PyObject *before, PyObject *value)
{
    Py_ssize_t pos = 0, size = PyDict_Size(value);
    PyObject *sub, *number;
    for (;;) {
        if (PyDict_Size(value) != size) {
            return size_changed();
        }
        if (!PyDict_Next(value, &pos, &sub, &number)) {
            return 0;
        }
        Py_INCREF(sub);
        Py_INCREF(number);
        PyObject *result = NULL;
        PyObject *earlier = PyDict_GetItemWithError(before, sub); /* borrowed */
        if (earlier == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (PyLong_CheckExact(number) && earlier != NULL && PyLong_CheckExact(earlier)) {
            Py_INCREF(earlier);
            int gauge = PySequence_Contains(cfg->agg_gauges, sub);
            if (gauge >= 0) {
                result = gauge ? Py_NewRef(number) : PyNumber_Add(earlier, number);
            }
            Py_DECREF(earlier);
            if (result == NULL) {
                goto error;
            }
        }
        else {
            result = Py_NewRef(number);
        }
        if (PyDict_SetItem(before, sub, result) < 0) {
            goto error;
        }
        Py_DECREF(result);
        Py_DECREF(sub);
        Py_DECREF(number);
        continue;
    error:
        Py_XDECREF(result);
        Py_DECREF(sub);
        Py_DECREF(number);
        return -1;
    }
}

/* one section of new into the same section of total (both exact dicts) */
static int
merge_section(const Config *cfg, PyObject *section, PyObject *out, PyObject *new)
{
    PyObject *gauges = PyDict_GetItemWithError(cfg->gauge_cache, section); /* borrowed */
    if (gauges != NULL && gauges != Py_None) {
        Py_INCREF(gauges);
    }
    else {
        if (gauges == NULL && PyErr_Occurred()) {
            return -1;
        }
        gauges = PyDict_New();
        if (gauges == NULL) {
            return -1;
        }
        if (PyDict_Size(cfg->gauge_cache) < cfg->cache_limit &&
            PyDict_SetItem(cfg->gauge_cache, section, gauges) < 0) {
            Py_DECREF(gauges);
            return -1;
        }
    }

    Py_ssize_t pos = 0, size = PyDict_Size(new);
    PyObject *field, *value;
    for (;;) {
        if (PyDict_Size(new) != size) {
            size_changed();
            goto fail;
        }
        if (!PyDict_Next(new, &pos, &field, &value)) {
            break;
        }
        Py_INCREF(field);
        Py_INCREF(value);
        PyObject *result = NULL;
        PyObject *before = PyDict_GetItemWithError(out, field); /* borrowed */
        if (before == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (PyLong_CheckExact(value) && before != NULL && PyLong_CheckExact(before)) {
            Py_INCREF(before);
            int gauge = gauge_of(cfg, gauges, section, field);
            if (gauge >= 0) {
                result = gauge ? Py_NewRef(value) : PyNumber_Add(before, value);
            }
            Py_DECREF(before);
            if (result == NULL) {
                goto error;
            }
        }
        else if (PyDict_CheckExact(value)) {
            if (before != NULL && PyDict_CheckExact(before)) {
                Py_INCREF(before);
                int failed = merge_agg(cfg, before, value);
                Py_DECREF(before);
                if (failed) {
                    goto error;
                }
                Py_DECREF(field);
                Py_DECREF(value);
                continue;
            }
            result = PyDict_Copy(value);
            if (result == NULL) {
                goto error;
            }
        }
        else {
            result = Py_NewRef(value);
        }
        if (PyDict_SetItem(out, field, result) < 0) {
            goto error;
        }
        Py_DECREF(result);
        Py_DECREF(field);
        Py_DECREF(value);
        continue;
    error:
        Py_XDECREF(result);
        Py_DECREF(field);
        Py_DECREF(value);
        goto fail;
    }
    Py_DECREF(gauges);
    return 0;
fail:
    Py_DECREF(gauges);
    return -1;
}

/* {field: dict(value) if type(value) is dict else value for field, value in values.items()} */
static PyObject *
copy_section(PyObject *values)
{
    PyObject *copy = PyDict_New();
    if (copy == NULL) {
        return NULL;
    }
    Py_ssize_t pos = 0, size = PyDict_Size(values);
    PyObject *field, *value;
    for (;;) {
        if (PyDict_Size(values) != size) {
            size_changed();
            goto fail;
        }
        if (!PyDict_Next(values, &pos, &field, &value)) {
            return copy;
        }
        Py_INCREF(field);
        PyObject *item = PyDict_CheckExact(value) ? PyDict_Copy(value) : Py_NewRef(value);
        int failed = item == NULL || PyDict_SetItem(copy, field, item) < 0;
        Py_XDECREF(item);
        Py_DECREF(field);
        if (failed) {
            goto fail;
        }
    }
fail:
    Py_DECREF(copy);
    return NULL;
}

static int
merge_top(const Config *cfg, PyObject *total, PyObject *new)
{
    Py_ssize_t pos = 0, size = PyDict_Size(new);
    PyObject *section, *values;
    for (;;) {
        if (PyDict_Size(new) != size) {
            return size_changed();
        }
        if (!PyDict_Next(new, &pos, &section, &values)) {
            return 0;
        }
        Py_INCREF(section);
        Py_INCREF(values);
        PyObject *before = NULL;
        int failed = 1;
        int skip = PyObject_RichCompareBool(section, timestamp_key, Py_EQ);
        if (skip < 0) {
            goto done;
        }
        if (skip) {
            failed = 0;
            goto done;
        }
        before = PyDict_GetItemWithError(total, section);
        if (before == NULL && PyErr_Occurred()) {
            goto done;
        }
        Py_XINCREF(before);
        if (PyDict_CheckExact(values)) {
            if (before != NULL && PyDict_CheckExact(before)) {
                failed = merge_section(cfg, section, before, values) < 0;
            }
            else {
                PyObject *copy = copy_section(values);
                failed = copy == NULL || PyDict_SetItem(total, section, copy) < 0;
                Py_XDECREF(copy);
            }
        }
        else {
            failed = PyDict_SetItem(total, section, values) < 0;
        }
    done:
        Py_XDECREF(before);
        Py_DECREF(section);
        Py_DECREF(values);
        if (failed) {
            return -1;
        }
    }
}

PyDoc_STRVAR(merge_into_doc,
"merge_into($module, gauge_cache, is_gauge, agg_gauges, cache_limit, total, new, /)\n"
"--\n"
"\n"
"Add one Firecracker metrics line (or a sum of lines) ``new`` into ``total``, in place.\n"
"\n"
"tests/fc_sum_reference.merge_into_reference with the same arguments; ``total``\n"
"and ``new`` must be dicts (exactly).");

static PyObject *
merge_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "merge_into() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    Config cfg = {args[0], args[1], args[2], 0};
    if (!PyDict_CheckExact(cfg.gauge_cache)) {
        return wrong_type("merge_into(): gauge_cache", "a dict", cfg.gauge_cache);
    }
    if (!PyCallable_Check(cfg.is_gauge)) {
        return wrong_type("merge_into(): is_gauge", "callable", cfg.is_gauge);
    }
    if (!PyLong_Check(args[3])) {
        return wrong_type("merge_into(): cache_limit", "an int", args[3]);
    }
    int overflow;
    cfg.cache_limit = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (overflow) {
        cfg.cache_limit = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    }
    else if (cfg.cache_limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyDict_CheckExact(args[4])) {
        return wrong_type("merge_into(): total", "a dict", args[4]);
    }
    if (!PyDict_CheckExact(args[5])) {
        return wrong_type("merge_into(): new", "a dict", args[5]);
    }
    /* the configuration is borrowed from args: the caller holds it for the call */
    if (merge_top(&cfg, args[4], args[5]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- add_text: totals kept as their own JSON text ----------------------------------- */

/* a JSON integer orjson reads into an int, as a signed 128-bit value: 1 (p moved past
 * it), 0 anything else */
static inline int
scan_int(const char **pp, const char *end, __int128 *value)
{
    const char *p = *pp;
    int minus = 0;
    if (p < end && *p == '-') {
        minus = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') {
        return 0;
    }
    unsigned long long magnitude = 0;
    if (*p == '0') {
        if (minus) {
            return 0; /* "-0": orjson's 0, but not a form Firecracker writes */
        }
        p++; /* a digit after it (a leading zero) is refused by the caller's next byte */
    }
    else {
        do {
            unsigned digit = (unsigned)(*p - '0');
            if (magnitude > (ULLONG_MAX - digit) / 10) {
                return 0; /* beyond 2**64 - 1: orjson makes a float */
            }
            magnitude = magnitude * 10 + digit;
            p++;
        } while (p < end && *p >= '0' && *p <= '9');
    }
    if (minus && magnitude > (1ULL << 63)) {
        return 0; /* below -2**63: a float too */
    }
    *value = minus ? -(__int128)magnitude : (__int128)magnitude;
    *pp = p;
    return 1;
}

/* whether line[0:len] == key[0:len] and none of those bytes is a control byte, '"' or
 * '\\' (where the line's string would be refused, end or escape): 8 bytes at a time */
#define BYTES(b) (0x0101010101010101ULL * (b))
static inline uint64_t
word_at(const char *s)
{
    uint64_t word;
    memcpy(&word, s, sizeof(word));
    return word;
}

/* non-zero when a byte of word is < 0x20, '"' or '\\' (the exact has-less / has-zero tests) */
static inline uint64_t
unplain(uint64_t word)
{
    uint64_t quote = word ^ BYTES('"'), backslash = word ^ BYTES('\\');
    return ((word - BYTES(0x20)) & ~word & BYTES(0x80)) |
           ((quote - BYTES(1)) & ~quote & BYTES(0x80)) |
           ((backslash - BYTES(1)) & ~backslash & BYTES(0x80));
}

static inline int
same_plain_bytes(const char *line, const char *key, Py_ssize_t len)
{
    if (len < 8) {
        for (Py_ssize_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)key[i];
            if ((unsigned char)line[i] != c || c < 0x20 || c == '"' || c == '\\') {
                return 0;
            }
        }
        return 1;
    }
    Py_ssize_t i = 0;
    for (; i + 8 < len; i += 8) {
        uint64_t word = word_at(key + i);
        if ((word ^ word_at(line + i)) | unplain(word)) {
            return 0;
        }
    }
    uint64_t word = word_at(key + len - 8); /* the last 8, overlapping */
    return !((word ^ word_at(line + len - 8)) | unplain(word));
}
#undef BYTES

static const char LINE_PREFIX[] = "{\"utc_timestamp_ms\":";
#define LINE_PREFIX_LEN ((Py_ssize_t)(sizeof(LINE_PREFIX) - 1))

/* '"<key>":' at *tp in the totals and at *lp in the line, the same plain bytes
 * (no control byte, quote or backslash): 1 (both moved past the colon, the key
 * copied to *op and *op past it, *key and *key_len the totals' key), 0 anything else */
static inline int
same_text_key(const char **tp, const char *tend, const char **lp, const char *lend, char **op,
              const char **key, Py_ssize_t *key_len)
{
    const char *t = *tp, *l = *lp;
    if (t >= tend || *t != '"' || l >= lend || *l != '"') {
        return 0;
    }
    const char *start = t + 1;
    const char *close = memchr(start, '"', (size_t)(tend - start));
    if (close == NULL || close + 1 >= tend || close[1] != ':') {
        return 0;
    }
    Py_ssize_t len = close - start;
    if (lend - l < len + 3 || l[len + 1] != '"' || l[len + 2] != ':' ||
        !same_plain_bytes(l + 1, start, len)) {
        return 0;
    }
    memcpy(*op, t, (size_t)len + 3);
    *op += len + 3;
    *key = start;
    *key_len = len;
    *tp = close + 2;
    *lp = l + len + 3;
    return 1;
}

/* after a member, in both texts: ',' (1: another member follows) or '}' (0: the
 * object ends), copied to *op; -1 when the two texts differ there */
static inline int
next_member(const char **tp, const char *tend, const char **lp, const char *lend, char **op)
{
    const char *t = *tp, *l = *lp;
    if (t >= tend || l >= lend || *t != *l || (*t != ',' && *t != '}')) {
        return -1;
    }
    *(*op)++ = *t;
    *tp = t + 1;
    *lp = l + 1;
    return *t == ',';
}

/* value (within [-2**63, 2**64 - 1]) in decimal at o; past it */
static inline char *
write_value(char *o, __int128 value)
{
    unsigned long long magnitude;
    if (value < 0) {
        *o++ = '-';
        magnitude = (unsigned long long)(-value);
    }
    else {
        magnitude = (unsigned long long)value;
    }
    char digits[20];
    int i = 20;
    do {
        digits[--i] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    memcpy(o, digits + i, (size_t)(20 - i));
    return o + 20 - i;
}

static PyObject *
signed_int(__int128 value)
{
    return value < 0 ? PyLong_FromLongLong((long long)value)
                     : PyLong_FromUnsignedLongLong((unsigned long long)value);
}

#define BOTH(c) (t < tend && *t == (c) && l < lend && *l == (c))
/* inside a loop over an object's members: on to the next, or out of the loop */
#define MEMBER_END()                                     \
    {                                                    \
        int more_ = next_member(&t, tend, &l, lend, &o); \
        if (more_ < 0) {                                 \
            return -1;                                   \
        }                                                \
        if (more_) {                                     \
            continue; /* the enclosing loop's */         \
        }                                                \
    }                                                    \
    break

/* The merged totals' text (at most (tend - t) + (lend - l) bytes) into out: its length,
 * or -1 when the line does not fit them; *timestamp and *missed the line's. */
static Py_ssize_t
sum_text(const unsigned char *layout, Py_ssize_t leaves, const char *t, const char *tend,
         const char *l, const char *lend, char *out, __int128 *timestamp, __int128 *missed)
{
    char *o = out;
    Py_ssize_t leaf = 0;
    const char *key;
    Py_ssize_t key_len;
    if (lend - l < LINE_PREFIX_LEN || memcmp(l, LINE_PREFIX, LINE_PREFIX_LEN) != 0) {
        return -1;
    }
    l += LINE_PREFIX_LEN;
    *missed = 0;
    if (!scan_int(&l, lend, timestamp) || t >= tend || *t != '{') {
        return -1;
    }
    t++;
    *o++ = '{';
    if (t < tend && *t == '}') { /* no sections yet: nor may the line have any */
        if (l >= lend || *l != '}') {
            return -1;
        }
        t++;
        l++;
        *o++ = '}';
        goto finished;
    }
    if (l >= lend || *l != ',') {
        return -1;
    }
    l++;
    for (;;) { /* sections */
        if (!same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
            return -1;
        }
        if (key_len == LINE_PREFIX_LEN - 4 && memcmp(key, LINE_PREFIX + 2, (size_t)key_len) == 0) {
            return -1; /* a second timestamp: the parse would keep that one */
        }
        int logger = key_len == 6 && memcmp(key, "logger", 6) == 0;
        if (!BOTH('{')) {
            return -1;
        }
        t++, l++, *o++ = '{';
        for (;;) { /* fields */
            if (!same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
                return -1;
            }
            int agg = BOTH('{');
            if (agg) {
                t++, l++, *o++ = '{';
            }
            int missed_field =
                !agg && logger && key_len == 20 && memcmp(key, "missed_metrics_count", 20) == 0;
            for (;;) { /* the field's one number, or an agg's subs */
                if (agg && !same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
                    return -1;
                }
                __int128 before, number;
                if (leaf >= leaves || !scan_int(&t, tend, &before) || !scan_int(&l, lend, &number)) {
                    return -1;
                }
                __int128 value = layout[leaf++] ? number : before + number;
                if (value > (__int128)ULLONG_MAX || value < -((__int128)1 << 63)) {
                    return -1; /* the objects keep the exact sum */
                }
                if (missed_field) {
                    *missed = number;
                }
                o = write_value(o, value);
                if (!agg) {
                    break;
                }
                MEMBER_END();
            }
            MEMBER_END();
        }
        MEMBER_END();
    }
finished:
    if (t != tend || l != lend || leaf != leaves) {
        return -1;
    }
    return o - out;
}
#undef MEMBER_END
#undef BOTH

PyDoc_STRVAR(add_text_doc,
"add_text(layout, totals, line, /) -> (new_totals, utc_timestamp_ms, missed) | None\n"
"--\n"
"\n"
"A Firecracker metrics line added into totals kept as JSON text, text to text.\n"
"\n"
"``totals`` is ``orjson.dumps(t)`` of totals ``t`` whose sections are\n"
"non-empty dicts of ints or of non-empty dicts of ints, and ``layout`` one\n"
"byte per integer leaf of ``t`` in order, non-zero where the leaf is a\n"
"gauge (fc_metrics_parse.text_layout). For a line in Firecracker's compact\n"
"form with ``t``'s sections, fields and agg keys in ``t``'s order, and no\n"
"sum beyond what orjson holds (-2**63 .. 2**64 - 1): ``orjson.dumps`` of\n"
"``t`` with the line merged in, the line's ``utc_timestamp_ms`` and its\n"
"``logger.missed_metrics_count`` (0 without one). Any other line (or totals): None.");

static PyObject *
add_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "add_text() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        if (!PyBytes_CheckExact(args[i])) {
            char what[32];
            snprintf(what, sizeof(what), "add_text(): argument %d", i + 1);
            return wrong_type(what, "bytes", args[i]);
        }
    }
    const char *t = PyBytes_AsString(args[1]), *l = PyBytes_AsString(args[2]);
    Py_ssize_t tlen = PyBytes_Size(args[1]), llen = PyBytes_Size(args[2]);
    /* each number written is at most one digit longer than the longer of the two it
     * sums, and every byte of the line's keys is room to spare: the two sizes together
     * always hold the result */
    char *out = PyMem_Malloc((size_t)(tlen + llen));
    if (out == NULL) {
        return PyErr_NoMemory();
    }
    __int128 timestamp, missed;
    Py_ssize_t len = sum_text((const unsigned char *)PyBytes_AsString(args[0]),
                              PyBytes_Size(args[0]), t, t + tlen, l, l + llen, out, &timestamp,
                              &missed);
    PyObject *answer = NULL;
    if (len < 0) {
        answer = Py_NewRef(Py_None);
    }
    else {
        PyObject *text = PyBytes_FromStringAndSize(out, len);
        PyObject *ts = text == NULL ? NULL : signed_int(timestamp);
        PyObject *lost = ts == NULL ? NULL : signed_int(missed);
        answer = lost == NULL ? NULL : PyTuple_Pack(3, text, ts, lost);
        Py_XDECREF(text);
        Py_XDECREF(ts);
        Py_XDECREF(lost);
    }
    PyMem_Free(out);
    return answer;
}

/* ---- trim: what a reading publishes of a delta or the totals ------------------------ */

/* Containers (objects and arrays) nested deeper than this are refused: deeper than
 * orjson writes (it stops at 255), so no text it serialises is. */
#define TRIM_MAX_DEPTH 1024

typedef struct {
    const char *end;  /* the text's end */
    const char *fail; /* where the text went wrong */
    /* the sections' names as written between their quotes; n_names -1: every section */
    const char **names;
    Py_ssize_t *name_lens;
    Py_ssize_t n_names;
} Trim;

/* The scanners below take the position of what they scan and give the position past
 * it, or NULL with s->fail set. Positions are locals, not fields: the output is written
 * through a char pointer, which may alias anything, and fields would be read again
 * after every byte written. */
static const char *
failed_at(Trim *s, const char *p)
{
    s->fail = p;
    return NULL;
}

static inline int
hex_digit(char c)
{
    unsigned char lower = (unsigned char)c | 0x20;
    return (c >= '0' && c <= '9') || (lower >= 'a' && lower <= 'f');
}

static inline int
is_digit(const char *p, const char *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

/* a JSON string ('"' at p) */
static const char *
string_end(Trim *s, const char *p)
{
    const char *end = s->end;
    p++;
    for (;;) {
        while (end - p >= 8) {
            uint64_t special = unplain(word_at(p));
            if (!special) {
                p += 8; /* no quote, backslash or control byte among these 8 */
                continue;
            }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            /* the lowest flag is exact (a borrow only runs on past a byte flagged
             * rightly): straight to the first such byte */
            p += __builtin_ctzll(special) / 8;
#endif
            break;
        }
        if (p >= end) {
            return failed_at(s, p);
        }
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            return p + 1;
        }
        if (c < 0x20) {
            return failed_at(s, p);
        }
        if (c != '\\') {
            p++;
        }
        else if (end - p >= 2 && p[1] != '\0' && strchr("\"\\/bfnrt", p[1]) != NULL) {
            p += 2;
        }
        else if (end - p >= 6 && p[1] == 'u' && hex_digit(p[2]) && hex_digit(p[3]) &&
                 hex_digit(p[4]) && hex_digit(p[5])) {
            p += 6;
        }
        else {
            return failed_at(s, p);
        }
    }
}

/* a JSON number */
static const char *
number_end(Trim *s, const char *p)
{
    const char *end = s->end;
    if (p < end && *p == '-') {
        p++;
    }
    if (p < end && *p == '0') {
        p++;
    }
    else if (is_digit(p, end)) {
        do {
            p++;
        } while (is_digit(p, end));
    }
    else {
        return failed_at(s, p);
    }
    if (p < end && *p == '.') {
        if (!is_digit(++p, end)) {
            return failed_at(s, p);
        }
        do {
            p++;
        } while (is_digit(p, end));
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (!is_digit(p, end)) {
            return failed_at(s, p);
        }
        do {
            p++;
        } while (is_digit(p, end));
    }
    return p;
}

/* any JSON value at p, inside ``depth`` containers */
static const char *
value_end(Trim *s, const char *p, int depth)
{
    const char *end = s->end;
    if (p >= end) {
        return failed_at(s, p);
    }
    char open = *p;
    switch (open) {
    case '"':
        return string_end(s, p);
    case 't':
        return end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : failed_at(s, p);
    case 'f':
        return end - p >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : failed_at(s, p);
    case 'n':
        return end - p >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : failed_at(s, p);
    case '{':
    case '[':
        break;
    default:
        return number_end(s, p);
    }
    char close = open == '{' ? '}' : ']';
    if (depth >= TRIM_MAX_DEPTH) {
        return failed_at(s, p);
    }
    p++;
    if (p < end && *p == close) {
        return p + 1;
    }
    for (;;) {
        if (open == '{') {
            if (p >= end || *p != '"') {
                return failed_at(s, p);
            }
            if ((p = string_end(s, p)) == NULL) {
                return NULL;
            }
            if (p >= end || *p != ':') {
                return failed_at(s, p);
            }
            p++;
        }
        if ((p = value_end(s, p, depth + 1)) == NULL) {
            return NULL;
        }
        if (p < end && *p == ',') {
            p++;
        }
        else if (p < end && *p == close) {
            return p + 1;
        }
        else {
            return failed_at(s, p);
        }
    }
}

/* whether a section's key (as written, without its quotes) is one of the names */
static int
named(const Trim *s, const char *key, Py_ssize_t len)
{
    for (Py_ssize_t i = 0; i < s->n_names; i++) {
        if (s->name_lens[i] == len && memcmp(s->names[i], key, (size_t)len) == 0) {
            return 1;
        }
    }
    return 0;
}

/* The object at *pp ('{' there; ``depth`` containers deep with it) written at *op
 * without its zero leaves and the objects that leaves empty; at the ``top``, only the
 * named sections. The members it kept (*pp and *op past the object), or -1 (s->fail
 * set).
 *
 * The output never gets ahead of the text: a byte is written only for one read (a
 * comma only before a member that follows one), so it fits in the text's length. */
static Py_ssize_t
trim_object(Trim *s, const char **pp, char **op, int depth, int top)
{
    const char *p = *pp + 1, *end = s->end;
    char *o = *op;
    Py_ssize_t kept = 0;
    *o++ = '{';
    if (p < end && *p == '}') {
        p++;
        goto close;
    }
    for (;;) {
        const char *key = p;
        if (p >= end || *p != '"') {
            failed_at(s, p);
            return -1;
        }
        if ((p = string_end(s, p)) == NULL) {
            return -1;
        }
        if (p >= end || *p != ':') {
            failed_at(s, p);
            return -1;
        }
        size_t key_len = (size_t)(++p - key); /* with its quotes and colon */
        const char *value = p;
        if (p < end && *p == '0' && end - p > 1 && (p[1] == ',' || p[1] == '}')) {
            p++; /* a zero: the most common leaf by far */
        }
        else if (top && s->n_names >= 0 && !named(s, key + 1, (Py_ssize_t)key_len - 3)) {
            if ((p = value_end(s, p, depth)) == NULL) {
                return -1;
            }
        }
        else if (p < end && *p == '{') {
            char *mark = o; /* back to it if the object is left empty */
            if (kept) {
                *o++ = ',';
            }
            memcpy(o, key, key_len);
            o += key_len;
            if (depth >= TRIM_MAX_DEPTH) {
                failed_at(s, p);
                return -1;
            }
            Py_ssize_t inner = trim_object(s, &p, &o, depth + 1, 0);
            if (inner < 0) {
                return -1;
            }
            if (inner) {
                kept++;
            }
            else {
                o = mark;
            }
        }
        else {
            if ((p = value_end(s, p, depth)) == NULL) {
                return -1;
            }
            /* "-0" is the integer 0 to a JSON reader too ("0" was taken above) */
            if (!(p - value == 2 && value[0] == '-' && value[1] == '0')) {
                if (kept) {
                    *o++ = ',';
                }
                memcpy(o, key, key_len);
                o += key_len;
                memcpy(o, value, (size_t)(p - value));
                o += p - value;
                kept++;
            }
        }
        if (p < end && *p == ',') {
            p++;
        }
        else if (p < end && *p == '}') {
            p++;
            break;
        }
        else {
            failed_at(s, p);
            return -1;
        }
    }
close:
    *o++ = '}';
    *pp = p;
    *op = o;
    return kept;
}

PyDoc_STRVAR(trim_doc,
"trim(text, sections, /) -> bytes\n"
"--\n"
"\n"
"What a reading publishes of a delta or the totals, text to text.\n"
"\n"
"``text`` is ``orjson.dumps(t)`` of a dict ``t``; ``sections`` None, or a tuple of\n"
"the names of the top-level members to keep, each as JSON writes it between its\n"
"quotes. ``orjson.dumps`` of tests/fc_sum_reference.trim_reference(t, sections):\n"
"no leaf whose value is the integer 0 and no object left empty, at any depth.\n"
"``text`` itself when nothing is left out. ValueError when ``text`` is not an\n"
"object in compact JSON (containers deeper than 1024 included).");

static PyObject *
trim(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "trim() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *text = args[0], *sections = args[1];
    if (!PyBytes_CheckExact(text)) {
        return wrong_type("trim(): argument 1", "bytes", text);
    }
    Py_ssize_t names = 0;
    if (sections != Py_None) {
        if (!PyTuple_CheckExact(sections)) {
            return wrong_type("trim(): sections", "None or a tuple of bytes", sections);
        }
        names = PyTuple_Size(sections);
        for (Py_ssize_t i = 0; i < names; i++) {
            PyObject *name = PyTuple_GetItem(sections, i); /* borrowed: the tuple holds it */
            if (name == NULL) {
                return NULL;
            }
            if (!PyBytes_CheckExact(name)) {
                return wrong_type("trim(): sections", "None or a tuple of bytes", name);
            }
        }
    }
    Py_ssize_t len = PyBytes_Size(text);
    const char *start = PyBytes_AsString(text);
    /* the names, then the output: never longer than the text (see trim_object) */
    size_t names_size = (size_t)names * (sizeof(char *) + sizeof(Py_ssize_t));
    char *memory = PyMem_Malloc(names_size + (size_t)len + 1);
    if (memory == NULL) {
        return PyErr_NoMemory();
    }
    Trim s = {start + len, start, (const char **)memory,
              (Py_ssize_t *)(memory + (size_t)names * sizeof(char *)),
              sections == Py_None ? -1 : names};
    for (Py_ssize_t i = 0; i < names; i++) {
        PyObject *name = PyTuple_GetItem(sections, i);
        s.names[i] = PyBytes_AsString(name);
        s.name_lens[i] = PyBytes_Size(name);
    }
    char *out = memory + names_size, *o = out;
    const char *p = start;
    PyObject *answer;
    int whole = len > 0 && *p == '{' && trim_object(&s, &p, &o, 1, 1) >= 0;
    if (whole && p != s.end) {
        whole = 0;
        s.fail = p; /* something after the object */
    }
    if (!whole) {
        PyErr_Format(PyExc_ValueError, "trim(): not compact JSON of an object at byte %zd",
                     (Py_ssize_t)(s.fail - start));
        answer = NULL;
    }
    else if (o - out == len) { /* nothing left out: the same bytes */
        answer = Py_NewRef(text);
    }
    else {
        answer = PyBytes_FromStringAndSize(out, o - out);
    }
    PyMem_Free(memory);
    return answer;
}

static PyMethodDef methods[] = {
    {"add_text", (PyCFunction)(void (*)(void))add_text, METH_FASTCALL, add_text_doc},
    {"merge_into", (PyCFunction)(void (*)(void))merge_into, METH_FASTCALL, merge_into_doc},
    {"trim", (PyCFunction)(void (*)(void))trim, METH_FASTCALL, trim_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cellos_probed.probes._fc_sum",
    .m_doc = "Firecracker metrics lines summed in C, and what a reading publishes of the "
             "sums: see add_text, merge_into and trim.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fc_sum(void)
{
    if (timestamp_key == NULL) {
        timestamp_key = PyUnicode_InternFromString("utc_timestamp_ms");
        if (timestamp_key == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module_def);
}
