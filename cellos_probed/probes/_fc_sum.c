/*
 * cellos_probed.probes._fc_sum: one Firecracker metrics line added into a
 * running total, in place, in C.
 *
 *     merge_into(gauge_cache, is_gauge, agg_gauges, cache_limit, total, new) -> None
 *     add_line(gauge_cache, is_gauge, agg_gauges, cache_limit, total, line)
 *         -> (utc_timestamp_ms, missed) | None
 *     add_text(layout, totals, line) -> (new_totals, utc_timestamp_ms, missed) | None
 *
 * add_line is merge_into of the line's text, without parsing it into
 * objects, for the lines shaped exactly as total: see above its definition.
 *
 * The first four arguments are the Python side's configuration, passed in so
 * that nothing here imports anything or keeps state; fc_metrics_parse binds
 * them once with functools.partial, so callers see merge_into(total, new):
 *
 *   gauge_cache  dict: section -> {field: is_gauge answer} (_section_gauges);
 *                filled here exactly as the reference fills it
 *   is_gauge     callable(section, field), called on a cache miss
 *   agg_gauges   container of the sub keys of *_agg objects that are gauges
 *                (_AGG_GAUGES: min_us, max_us)
 *   cache_limit  int: a new section's answers are cached only while the
 *                cache has fewer sections than this (_GAUGE_CACHE_LIMIT)
 *   total, new   exact dicts (TypeError otherwise: the reference would take
 *                dict subclasses too, but lines come from orjson); total is
 *                changed, new not
 *
 * The specification is the pure-Python fc_metrics_parse.merge_into_reference:
 * the same steps in the same order, with the same exact type checks (an int
 * or dict subclass, a bool, is "anything else"), Python int addition
 * (arbitrary precision: saturation happens when the sums are serialised),
 * and the same exceptions (an error from is_gauge, a key's __hash__/__eq__,
 * or a dict changing size under its iteration propagates, with whatever was
 * merged before it left merged, as in the reference).
 *
 * The one difference is object identity of ints: a counter plus the int 0
 * keeps the total's int object rather than a new equal one (see Version).
 *
 * References: every key and value taken from a dict by PyDict_Next or a
 * look-up is borrowed, so it is held (Py_INCREF) across anything that may
 * run Python code (is_gauge, a key's __eq__, a finaliser of a replaced
 * value), which could change or free it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>

typedef struct {
    PyObject *gauge_cache; /* exact dict */
    PyObject *is_gauge;
    PyObject *agg_gauges;
    long long cache_limit;
} Config;

/* "utc_timestamp_ms" (TIMESTAMP_KEY) and the int 0, made once at import */
static PyObject *timestamp_key;
static PyObject *zero;

/*
 * Most leaves of a line are 0, and before + 0 is before: storing it back
 * (an equal int) is skipped when the dict has not changed since before was
 * read from it, which CPython 3.11's per-dict version tag (PEP 509) shows;
 * is_gauge or a key's __eq__ running in between could have changed it.
 * Later Pythons deprecate the tag: there every result is stored.
 */
#if PY_VERSION_HEX < 0x030C0000
typedef uint64_t Version;
#define version_of(d) (((PyDictObject *)(d))->ma_version_tag)
#define unchanged_since(d, v) (version_of(d) == (v))
#else
typedef int Version;
#define version_of(d) 0
#define unchanged_since(d, v) ((void)(v), 0)
#endif

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
    if (!PyDict_Check(gauges)) {
        PyErr_Format(PyExc_TypeError, "gauge cache entry for %R is a %.100s, not a dict",
                     section, Py_TYPE(gauges)->tp_name);
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
        PyObject *args[2] = {section, field};
        answer = PyObject_Vectorcall(cfg->is_gauge, args, 2, NULL);
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
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(value);
    PyObject *sub, *number;
    for (;;) {
        if (PyDict_GET_SIZE(value) != size) {
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
            Version version = version_of(before);
            Py_INCREF(earlier);
            int gauge = PySequence_Contains(cfg->agg_gauges, sub);
            if (gauge < 0) {
                Py_DECREF(earlier);
                goto error;
            }
            if (gauge) {
                result = Py_NewRef(number);
            }
            else if (number == zero) {
                result = Py_NewRef(earlier);
            }
            else {
                result = PyNumber_Add(earlier, number);
            }
            Py_DECREF(earlier);
            if (result == NULL) {
                goto error;
            }
            if (result == earlier && unchanged_since(before, version)) {
                Py_DECREF(result); /* before[sub] is this very object */
                Py_DECREF(sub);
                Py_DECREF(number);
                continue;
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
        if (PyDict_GET_SIZE(cfg->gauge_cache) < cfg->cache_limit &&
            PyDict_SetItem(cfg->gauge_cache, section, gauges) < 0) {
            Py_DECREF(gauges);
            return -1;
        }
    }

    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(new);
    PyObject *field, *value;
    for (;;) {
        if (PyDict_GET_SIZE(new) != size) {
            size_changed();
            goto fail;
        }
        if (!PyDict_Next(new, &pos, &field, &value)) {
            break;
        }
        /* strong references for the step: is_gauge, a key's __eq__ or a
         * replaced value's finaliser may run code that changes these dicts */
        Py_INCREF(field);
        Py_INCREF(value);
        PyObject *result = NULL;
        PyObject *before = PyDict_GetItemWithError(out, field); /* borrowed */
        if (before == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (PyLong_CheckExact(value)) {
            if (before != NULL && PyLong_CheckExact(before)) {
                Version version = version_of(out);
                Py_INCREF(before);
                int gauge = gauge_of(cfg, gauges, section, field);
                if (gauge < 0) {
                    Py_DECREF(before);
                    goto error;
                }
                if (gauge) {
                    result = Py_NewRef(value);
                }
                else if (value == zero) {
                    result = Py_NewRef(before); /* equal to before + 0 */
                }
                else {
                    result = PyNumber_Add(before, value);
                }
                Py_DECREF(before);
                if (result == NULL) {
                    goto error;
                }
                if (result == before && unchanged_since(out, version)) {
                    Py_DECREF(result); /* out[field] is this very object */
                    Py_DECREF(field);
                    Py_DECREF(value);
                    continue;
                }
            }
            else {
                result = Py_NewRef(value);
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
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(values);
    PyObject *field, *value;
    for (;;) {
        if (PyDict_GET_SIZE(values) != size) {
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
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(new);
    PyObject *section, *values;
    for (;;) {
        if (PyDict_GET_SIZE(new) != size) {
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

/* The four leading arguments both functions share, checked: 0, or -1 with
 * TypeError (``name`` is the caller's, for the message) */
static int
config_of(const char *name, PyObject *const *args, Py_ssize_t nargs, Config *cfg)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 6 positional arguments (%zd given)",
                     name, nargs);
        return -1;
    }
    *cfg = (Config){args[0], args[1], args[2], 0};
    if (!PyDict_CheckExact(cfg->gauge_cache)) {
        PyErr_Format(PyExc_TypeError, "%s(): gauge_cache must be a dict, not %.100s", name,
                     Py_TYPE(cfg->gauge_cache)->tp_name);
        return -1;
    }
    if (!PyCallable_Check(cfg->is_gauge)) {
        PyErr_Format(PyExc_TypeError, "%s(): is_gauge must be callable, not %.100s", name,
                     Py_TYPE(cfg->is_gauge)->tp_name);
        return -1;
    }
    if (!PyLong_Check(args[3])) {
        PyErr_Format(PyExc_TypeError, "%s(): cache_limit must be an int, not %.100s", name,
                     Py_TYPE(args[3])->tp_name);
        return -1;
    }
    int overflow;
    cfg->cache_limit = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (overflow) {
        cfg->cache_limit = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    }
    else if (cfg->cache_limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(merge_into_doc,
"merge_into($module, gauge_cache, is_gauge, agg_gauges, cache_limit, total, new, /)\n"
"--\n"
"\n"
"Add one Firecracker metrics line ``new`` into ``total``, in place.\n"
"\n"
"The same result as fc_metrics_parse.merge_into_reference(total, new) with\n"
"_section_gauges, is_gauge, _AGG_GAUGES and _GAUGE_CACHE_LIMIT as the first\n"
"four arguments. ``total`` and ``new`` must be dicts (exactly).");

static PyObject *
merge_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Config cfg;
    if (config_of("merge_into", args, nargs, &cfg) < 0) {
        return NULL;
    }
    PyObject *total = args[4], *new = args[5];
    if (!PyDict_CheckExact(total) || !PyDict_CheckExact(new)) {
        PyErr_Format(PyExc_TypeError, "merge_into(): total and new must be dicts, not %.100s and %.100s",
                     Py_TYPE(total)->tp_name, Py_TYPE(new)->tp_name);
        return NULL;
    }
    /* the configuration is borrowed from args: the caller holds it for the call */
    if (merge_top(&cfg, total, new) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/*
 * add_line(gauge_cache, is_gauge, agg_gauges, cache_limit, total, line, /)
 *
 * One line's TEXT added into total, without the line's Python objects: the
 * same effect as
 *
 *     found = orjson.loads(line); found.pop("utc_timestamp_ms"); merge_into(total, found)
 *
 * for the lines it takes, and None (total untouched) for every other line,
 * which the caller then parses and merges the ordinary way. It takes only
 * Firecracker's own compact form of a line shaped exactly as total:
 *
 *   {"utc_timestamp_ms":<int>,"<section>":{"<field>":<int>,"<agg>":{"<sub>":<int>,...},...},...}
 *
 * with no whitespace anywhere and nothing after the last '}'; the sections,
 * in order, are total's keys in its order (all of them, no other), each one
 * an exact dict in total whose keys the section's members are, in order; a
 * field is an integer where total holds an exact int, an object of the
 * agg's keys in order (each an integer, each an exact int in total) where
 * total holds an exact dict of exact ints. Keys are exact strs in total and
 * the very bytes of their UTF-8 in the line (no escape, no control byte).
 * Integers are what orjson reads into an int: -?(0|[1-9][0-9]*) within
 * -2**63..2**64-1 (beyond it orjson makes a float); "-0", which orjson
 * reads as 0, is refused too (Firecracker never writes it). A top-level
 * "utc_timestamp_ms" in total (the line would hold two) is refused, and so
 * is an empty total.
 *
 * The line is checked whole first (into a C array of its keys and values:
 * nothing there runs Python code nor changes anything), then applied: the
 * steps of merge_top/merge_section/merge_agg in the same order, with the
 * same gauge-cache filling, over the checked values instead of a parsed
 * dict. Where merge_into looks a key up, the pointer the check found is
 * used instead while the dict it came from is the same object with the same
 * version tag as then (or as after this function's own store into it);
 * once anything else may have changed it (is_gauge, a cache's or
 * agg_gauges' Python code, a finaliser run by a collection), every later
 * step in that dict looks up like merge_into, with keys decoded from the
 * line's text (the total's own key objects may be gone by then). The
 * result is merge_into's at every step, so an error (is_gauge raising, a
 * MemoryError) propagates with total left as merge_into leaves it: the
 * sections and fields before the failing one merged, the rest not. Without
 * the version tag (Python 3.12+) every step looks up: the same results,
 * slower.
 *
 * A gauge answer is read from the section's cache by walking it along the
 * fields (see apply_section) while its entries are theirs, in order: the
 * entry a look-up finds, without the look-up. The one difference from
 * merge_into: a cache holding a non-str key of the same hash as a field,
 * whose __eq__ a look-up would call, does not see that call (the module's
 * cache holds the sections' own str keys only).
 *
 * Returns (utc_timestamp_ms, missed): the line's timestamp and its
 * logger.missed_metrics_count where that is an integer field of the line,
 * else 0; both made before total is touched.
 */

enum { NODE_SECTION, NODE_INT, NODE_AGG, NODE_SUB };

typedef struct {
    const char *key;         /* the key's bytes in the line (its UTF-8) */
    Py_ssize_t key_len;
    PyObject *key_obj;       /* borrowed: the equal key of total's dict, at the check */
    PyObject *before;        /* borrowed: total's value at the check (a dict, or an int) */
    Version version;         /* of before, a dict, at the check */
    Py_ssize_t children;     /* a section's fields, an agg's subs */
    unsigned long long magnitude; /* an integer's absolute value */
    int negative;
    int kind;
} Node;

typedef struct {
    Node *nodes; /* PyMem */
    Py_ssize_t len, cap;
} Nodes;

/* The node array kept from one call to the next (a line's ~300 nodes need ~20 KB:
 * not on the C stack, which is_gauge may re-enter deeply, nor allocated per line).
 * A call takes it (NULL meanwhile: a call re-entered from is_gauge allocates its
 * own) and gives it back unless it grew past SPARE_NODES. */
#define FIRST_NODES 512
#define SPARE_NODES 4096
static Node *spare_nodes;
static Py_ssize_t spare_cap;

static int
take_nodes(Nodes *n)
{
    n->len = 0;
    if (spare_nodes != NULL) {
        n->nodes = spare_nodes;
        n->cap = spare_cap;
        spare_nodes = NULL;
        return 0;
    }
    n->nodes = PyMem_Malloc(FIRST_NODES * sizeof(Node));
    if (n->nodes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    n->cap = FIRST_NODES;
    return 0;
}

static void
give_back_nodes(Nodes *n)
{
    if (spare_nodes == NULL && n->cap <= SPARE_NODES) {
        spare_nodes = n->nodes;
        spare_cap = n->cap;
    }
    else {
        PyMem_Free(n->nodes);
    }
    n->nodes = NULL;
}

/* twice the room, or -1 (MemoryError set); pointers into nodes move */
static Py_ssize_t
grow_nodes(Nodes *n)
{
    if (n->cap > PY_SSIZE_T_MAX / 2 / (Py_ssize_t)sizeof(Node)) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = n->cap * 2;
    Node *grown = PyMem_Realloc(n->nodes, (size_t)cap * sizeof(Node));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    n->nodes = grown;
    n->cap = cap;
    return 0;
}

/* a new node's index, or -1 (MemoryError set) */
static inline Py_ssize_t
push_node(Nodes *n, int kind)
{
    if (n->len == n->cap && grow_nodes(n) < 0) {
        return -1;
    }
    n->nodes[n->len] = (Node){.kind = kind};
    return n->len++;
}

/* a JSON integer orjson reads into an int: 1 (p moved past it), 0 anything else */
static inline int
scan_int(const char **pp, const char *end, int *negative, unsigned long long *magnitude)
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
    unsigned long long value = 0;
    if (*p == '0') {
        if (minus) {
            return 0; /* "-0": orjson's 0, but not a form Firecracker writes */
        }
        p++; /* a digit after it (a leading zero) is refused by the caller's next byte */
    }
    else {
        do {
            unsigned digit = (unsigned)(*p - '0');
            if (value > (ULLONG_MAX - digit) / 10) {
                return 0; /* beyond 2**64 - 1: orjson makes a float */
            }
            value = value * 10 + digit;
            p++;
        } while (p < end && *p >= '0' && *p <= '9');
    }
    if (minus && value > (1ULL << 63)) {
        return 0; /* below -2**63: a float too */
    }
    *negative = minus;
    *magnitude = value;
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

/* '"<key>":' at *pp, key the UTF-8 of key_obj (an exact str): 1 (p moved past the
 * colon, the node given the key), 0 anything else, -1 error */
static inline int
scan_key(const char **pp, const char *end, PyObject *key_obj, Node *node)
{
    if (!PyUnicode_CheckExact(key_obj)) {
        return 0;
    }
    const char *key;
    Py_ssize_t len;
    if (PyUnicode_IS_READY(key_obj) && PyUnicode_IS_COMPACT_ASCII(key_obj)) {
        key = (const char *)PyUnicode_DATA(key_obj);
        len = PyUnicode_GET_LENGTH(key_obj);
    }
    else {
        key = PyUnicode_AsUTF8AndSize(key_obj, &len);
        if (key == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                PyErr_Clear(); /* a lone surrogate: no line's key decodes to it */
                return 0;
            }
            return -1;
        }
    }
    const char *p = *pp;
    if (end - p < len + 3 || p[0] != '"' || p[len + 1] != '"' || p[len + 2] != ':' ||
        !same_plain_bytes(p + 1, key, len)) {
        return 0;
    }
    node->key = p + 1;
    node->key_len = len;
    node->key_obj = key_obj;
    *pp = p + len + 3;
    return 1;
}

static const char LINE_PREFIX[] = "{\"utc_timestamp_ms\":";
#define LINE_PREFIX_LEN ((Py_ssize_t)(sizeof(LINE_PREFIX) - 1))

#define SCAN_KEY(dict_key, index)                                      \
    do {                                                               \
        int found_ = scan_key(&p, end, (dict_key), &n->nodes[index]); \
        if (found_ <= 0) {                                             \
            return found_;                                             \
        }                                                              \
    } while (0)

#define EXPECT(c)                      \
    do {                               \
        if (p >= end || *p != (c)) {   \
            return 0;                  \
        }                              \
        p++;                           \
    } while (0)

/* The line checked against total, its keys and values into n (sections in order,
 * each followed by its fields, each agg by its subs): 1 it fits, 0 it does not,
 * -1 error. *missed: the index of logger.missed_metrics_count's node, or -1. */
static int
scan_line(const char *p, const char *end, PyObject *total, Nodes *n, int *ts_negative,
          unsigned long long *ts_magnitude, Py_ssize_t *missed)
{
    *missed = -1;
    if (PyDict_GET_SIZE(total) == 0 || end - p < LINE_PREFIX_LEN ||
        memcmp(p, LINE_PREFIX, (size_t)LINE_PREFIX_LEN) != 0) {
        return 0;
    }
    p += LINE_PREFIX_LEN;
    if (!scan_int(&p, end, ts_negative, ts_magnitude)) {
        return 0;
    }
    Py_ssize_t pos = 0;
    PyObject *section_key, *section;
    while (PyDict_Next(total, &pos, &section_key, &section)) {
        EXPECT(',');
        Py_ssize_t s = push_node(n, NODE_SECTION);
        if (s < 0) {
            return -1;
        }
        SCAN_KEY(section_key, s);
        if (!PyDict_CheckExact(section) ||
            (n->nodes[s].key_len == LINE_PREFIX_LEN - 4 &&
             memcmp(n->nodes[s].key, LINE_PREFIX + 2, (size_t)LINE_PREFIX_LEN - 4) == 0)) {
            return 0; /* not a dict in total; or a second utc_timestamp_ms */
        }
        int logger = n->nodes[s].key_len == 6 && memcmp(n->nodes[s].key, "logger", 6) == 0;
        n->nodes[s].before = section;
        n->nodes[s].version = version_of(section);
        n->nodes[s].children = PyDict_GET_SIZE(section);
        EXPECT('{');
        Py_ssize_t field_pos = 0;
        PyObject *field_key, *field;
        for (int first = 1; PyDict_Next(section, &field_pos, &field_key, &field); first = 0) {
            if (!first) {
                EXPECT(',');
            }
            if (PyLong_CheckExact(field)) {
                Py_ssize_t f = push_node(n, NODE_INT);
                if (f < 0) {
                    return -1;
                }
                SCAN_KEY(field_key, f);
                Node *node = &n->nodes[f];
                node->before = field;
                if (!scan_int(&p, end, &node->negative, &node->magnitude)) {
                    return 0;
                }
                if (logger && node->key_len == 20 &&
                    memcmp(node->key, "missed_metrics_count", 20) == 0) {
                    *missed = f;
                }
            }
            else if (PyDict_CheckExact(field)) {
                Py_ssize_t f = push_node(n, NODE_AGG);
                if (f < 0) {
                    return -1;
                }
                SCAN_KEY(field_key, f);
                n->nodes[f].before = field;
                n->nodes[f].version = version_of(field);
                n->nodes[f].children = PyDict_GET_SIZE(field);
                EXPECT('{');
                Py_ssize_t sub_pos = 0;
                PyObject *sub_key, *sub;
                for (int first_sub = 1; PyDict_Next(field, &sub_pos, &sub_key, &sub);
                     first_sub = 0) {
                    if (!first_sub) {
                        EXPECT(',');
                    }
                    if (!PyLong_CheckExact(sub)) {
                        return 0;
                    }
                    Py_ssize_t u = push_node(n, NODE_SUB);
                    if (u < 0) {
                        return -1;
                    }
                    SCAN_KEY(sub_key, u);
                    Node *node = &n->nodes[u];
                    node->before = sub;
                    if (!scan_int(&p, end, &node->negative, &node->magnitude)) {
                        return 0;
                    }
                }
                EXPECT('}');
            }
            else {
                return 0;
            }
        }
        EXPECT('}');
    }
    EXPECT('}');
    return p == end;
}

#undef SCAN_KEY
#undef EXPECT

static int
node_is_zero(const Node *node)
{
    return node->magnitude == 0;
}

static PyObject *
node_int(const Node *node)
{
    if (!node->negative) {
        return PyLong_FromUnsignedLongLong(node->magnitude);
    }
    return PyLong_FromLongLong(node->magnitude == (1ULL << 63) ? LLONG_MIN
                                                               : -(long long)node->magnitude);
}

/* before (an exact int) + the node's integer, as Python adds them */
static PyObject *
node_add(PyObject *before, const Node *node)
{
    int overflow;
    long long a = PyLong_AsLongLongAndOverflow(before, &overflow);
    if (!overflow && (node->negative || node->magnitude <= (unsigned long long)LLONG_MAX)) {
        long long b = node->negative ? (node->magnitude == (1ULL << 63)
                                            ? LLONG_MIN
                                            : -(long long)node->magnitude)
                                     : (long long)node->magnitude;
        long long sum;
        if (!(a == -1 && PyErr_Occurred()) && !__builtin_add_overflow(a, b, &sum)) {
            return PyLong_FromLongLong(sum);
        }
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *value = node_int(node);
    if (value == NULL) {
        return NULL;
    }
    PyObject *sum = PyNumber_Add(before, value);
    Py_DECREF(value);
    return sum;
}

/* a new reference to the node's key: total's own object while the dict it was
 * found in is trusted (holds it still), else an equal str made from the line */
static PyObject *
node_key(const Node *node, int trusted)
{
    if (trusted) {
        return Py_NewRef(node->key_obj);
    }
    return PyUnicode_DecodeUTF8(node->key, node->key_len, NULL);
}

/* whether key (a dict's key) is the node's key, the str field or one equal to it */
static inline int
same_key(PyObject *key, PyObject *field, const Node *node)
{
    return key == field ||
           (PyUnicode_CheckExact(key) && PyUnicode_IS_READY(key) && PyUnicode_IS_COMPACT_ASCII(key) &&
            PyUnicode_GET_LENGTH(key) == node->key_len &&
            memcmp(PyUnicode_DATA(key), node->key, (size_t)node->key_len) == 0);
}

/* {sub: int, ...}: the agg node as the parsed line's dict */
static PyObject *
agg_dict(const Node *agg)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 1; i <= agg->children; i++) {
        PyObject *key = node_key(&agg[i], 0);
        PyObject *value = key == NULL ? NULL : node_int(&agg[i]);
        int failed = value == NULL || PyDict_SetItem(dict, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

/* the section node as copy_section makes it from the parsed line */
static PyObject *
section_dict(const Node *section)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    const Node *field = section + 1;
    for (Py_ssize_t i = 0; i < section->children; i++) {
        PyObject *key = node_key(field, 0);
        PyObject *value = NULL;
        if (key != NULL) {
            value = field->kind == NODE_AGG ? agg_dict(field) : node_int(field);
        }
        int failed = value == NULL || PyDict_SetItem(dict, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(dict);
            return NULL;
        }
        field += 1 + (field->kind == NODE_AGG ? field->children : 0);
    }
    return dict;
}

/* whether a dict still is the one a node's pointers were taken from, as it was then */
#define TRUSTED(dict, node, version) ((dict) == (node)->before && unchanged_since((dict), (version)))

/* merge_agg: the agg node's subs into before (an exact dict, held by the caller) */
static int
apply_agg(const Config *cfg, const Node *agg, PyObject *before)
{
    Version trusted_version = agg->version;
    for (Py_ssize_t i = 1; i <= agg->children; i++) {
        const Node *node = &agg[i];
        int trusted = TRUSTED(before, agg, trusted_version);
        PyObject *sub = node_key(node, trusted);
        if (sub == NULL) {
            return -1;
        }
        PyObject *result = NULL;
        PyObject *earlier = trusted ? node->before : PyDict_GetItemWithError(before, sub);
        if (earlier == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (earlier != NULL && PyLong_CheckExact(earlier)) {
            Version version = version_of(before);
            Py_INCREF(earlier);
            int gauge = PySequence_Contains(cfg->agg_gauges, sub);
            if (gauge < 0) {
                Py_DECREF(earlier);
                goto error;
            }
            if (gauge) {
                result = node_int(node);
            }
            else if (node_is_zero(node)) {
                result = Py_NewRef(earlier);
            }
            else {
                result = node_add(earlier, node);
            }
            Py_DECREF(earlier);
            if (result == NULL) {
                goto error;
            }
            if (result == earlier && unchanged_since(before, version)) {
                Py_DECREF(result); /* before[sub] is this very object */
                Py_DECREF(sub);
                continue;
            }
        }
        else {
            result = node_int(node);
            if (result == NULL) {
                goto error;
            }
        }
        /* replacing a trusted dict's exact int runs no Python code: still trusted after */
        trusted = TRUSTED(before, agg, trusted_version);
        if (PyDict_SetItem(before, sub, result) < 0) {
            goto error;
        }
        if (trusted) {
            trusted_version = version_of(before);
        }
        Py_DECREF(result);
        Py_DECREF(sub);
        continue;
    error:
        Py_XDECREF(result);
        Py_DECREF(sub);
        return -1;
    }
    return 0;
}

/* merge_section: the section node's fields into out (an exact dict, held by the caller) */
static int
apply_section(const Config *cfg, const Node *node, PyObject *section, PyObject *out)
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
        if (PyDict_GET_SIZE(cfg->gauge_cache) < cfg->cache_limit &&
            PyDict_SetItem(cfg->gauge_cache, section, gauges) < 0) {
            Py_DECREF(gauges);
            return -1;
        }
    }

    /* gauges[field] for field after field: a section's cache holds its int fields in
     * their order (filled by the first merge into it), so walking it along with the
     * fields finds each answer without a look-up; the first entry that is not the
     * next field's (a key not equal to it, an answer not a bool) ends the walk */
    int walking = PyDict_CheckExact(gauges);
    Py_ssize_t walk = 0;
    Version trusted_version = node->version;
    const Node *next = node + 1;
    for (Py_ssize_t i = 0; i < node->children; i++) {
        const Node *item = next;
        next += 1 + (item->kind == NODE_AGG ? item->children : 0);
        int trusted = TRUSTED(out, node, trusted_version);
        PyObject *field = node_key(item, trusted);
        if (field == NULL) {
            goto fail;
        }
        PyObject *result = NULL;
        PyObject *before = trusted ? item->before : PyDict_GetItemWithError(out, field);
        if (before == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (item->kind == NODE_INT) {
            if (before != NULL && PyLong_CheckExact(before)) {
                Version version = version_of(out);
                Py_INCREF(before);
                int gauge = -1;
                if (walking) {
                    PyObject *known, *answer;
                    walking = PyDict_Next(gauges, &walk, &known, &answer) &&
                              (answer == Py_True || answer == Py_False) &&
                              same_key(known, field, item);
                    gauge = walking ? answer == Py_True : -1;
                }
                if (gauge < 0) {
                    gauge = gauge_of(cfg, gauges, section, field);
                }
                if (gauge < 0) {
                    Py_DECREF(before);
                    goto error;
                }
                if (gauge) {
                    result = node_int(item);
                }
                else if (node_is_zero(item)) {
                    result = Py_NewRef(before); /* equal to before + 0 */
                }
                else {
                    result = node_add(before, item);
                }
                Py_DECREF(before);
                if (result == NULL) {
                    goto error;
                }
                if (result == before && unchanged_since(out, version)) {
                    Py_DECREF(result); /* out[field] is this very object */
                    Py_DECREF(field);
                    continue;
                }
            }
            else {
                result = node_int(item);
                if (result == NULL) {
                    goto error;
                }
            }
        }
        else {
            if (before != NULL && PyDict_CheckExact(before)) {
                Py_INCREF(before);
                int failed = apply_agg(cfg, item, before);
                Py_DECREF(before);
                if (failed) {
                    goto error;
                }
                Py_DECREF(field);
                continue;
            }
            result = agg_dict(item);
            if (result == NULL) {
                goto error;
            }
        }
        trusted = TRUSTED(out, node, trusted_version);
        if (PyDict_SetItem(out, field, result) < 0) {
            goto error;
        }
        if (trusted) {
            trusted_version = version_of(out);
        }
        Py_DECREF(result);
        Py_DECREF(field);
        continue;
    error:
        Py_XDECREF(result);
        Py_DECREF(field);
        goto fail;
    }
    Py_DECREF(gauges);
    return 0;
fail:
    Py_DECREF(gauges);
    return -1;
}

/* merge_top: every section node into total */
static int
apply_line(const Config *cfg, PyObject *total, Version total_version, const Nodes *n)
{
    Py_ssize_t at = 0;
    while (at < n->len) {
        const Node *node = &n->nodes[at];
        int trusted = unchanged_since(total, total_version);
        PyObject *section = node_key(node, trusted);
        if (section == NULL) {
            return -1;
        }
        int failed = 1;
        PyObject *before = trusted ? node->before : PyDict_GetItemWithError(total, section);
        if (before == NULL && PyErr_Occurred()) {
            Py_DECREF(section);
            return -1;
        }
        Py_XINCREF(before);
        if (before != NULL && PyDict_CheckExact(before)) {
            failed = apply_section(cfg, node, section, before) < 0;
        }
        else {
            PyObject *copy = section_dict(node);
            failed = copy == NULL || PyDict_SetItem(total, section, copy) < 0;
            Py_XDECREF(copy);
        }
        Py_XDECREF(before);
        Py_DECREF(section);
        if (failed) {
            return -1;
        }
        /* the next section: past this one's fields and their subs */
        Py_ssize_t end = at + 1;
        for (Py_ssize_t i = 0; i < node->children; i++) {
            const Node *field = &n->nodes[end];
            end += 1 + (field->kind == NODE_AGG ? field->children : 0);
        }
        at = end;
    }
    return 0;
}

#undef TRUSTED

PyDoc_STRVAR(add_line_doc,
"add_line($module, gauge_cache, is_gauge, agg_gauges, cache_limit, total, line, /)\n"
"--\n"
"\n"
"Add one Firecracker metrics line's text ``line`` (bytes) into ``total``, in place.\n"
"\n"
"For a line in Firecracker's compact form shaped exactly as ``total`` (the\n"
"same sections, fields and agg keys in the same order, integers where\n"
"``total`` holds ints): the effect of ``found = orjson.loads(line);\n"
"found.pop('utc_timestamp_ms'); merge_into(total, found)``, and\n"
"``(utc_timestamp_ms, logger.missed_metrics_count or 0)`` returned. Any\n"
"other line: None, ``total`` untouched. The first four arguments are\n"
"merge_into's.");

static PyObject *
add_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Config cfg;
    if (config_of("add_line", args, nargs, &cfg) < 0) {
        return NULL;
    }
    PyObject *total = args[4], *line = args[5];
    if (!PyDict_CheckExact(total)) {
        PyErr_Format(PyExc_TypeError, "add_line(): total must be a dict, not %.100s",
                     Py_TYPE(total)->tp_name);
        return NULL;
    }
    if (!PyBytes_Check(line)) {
        PyErr_Format(PyExc_TypeError, "add_line(): line must be bytes, not %.100s",
                     Py_TYPE(line)->tp_name);
        return NULL;
    }

    Nodes n;
    if (take_nodes(&n) < 0) {
        return NULL;
    }
    PyObject *answer = NULL;
    int ts_negative = 0;
    unsigned long long ts_magnitude = 0;
    Py_ssize_t missed = -1;
    const char *text = PyBytes_AS_STRING(line);
    Version total_version = version_of(total);
    int fits = scan_line(text, text + PyBytes_GET_SIZE(line), total, &n, &ts_negative,
                         &ts_magnitude, &missed);
    if (fits <= 0) {
        if (fits == 0) {
            answer = Py_NewRef(Py_None);
        }
        goto done;
    }
    /* the answer first: nothing can fail after total is changed but the merge itself */
    Node ts = {0};
    ts.negative = ts_negative;
    ts.magnitude = ts_magnitude;
    PyObject *timestamp = node_int(&ts);
    PyObject *lost = timestamp == NULL ? NULL
                     : missed < 0      ? Py_NewRef(zero)
                                       : node_int(&n.nodes[missed]);
    if (lost != NULL) {
        answer = PyTuple_Pack(2, timestamp, lost);
    }
    Py_XDECREF(timestamp);
    Py_XDECREF(lost);
    /* the configuration is borrowed from args: the caller holds it for the call */
    if (answer != NULL && apply_line(&cfg, total, total_version, &n) < 0) {
        Py_CLEAR(answer);
    }
done:
    give_back_nodes(&n);
    return answer;
}

/* ---- add_text: totals kept as their own JSON text ---------------------------------- */

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

/* an integer as scan_int takes it, as a signed 128-bit value: 1, or 0 not one */
static inline int
scan_value(const char **pp, const char *end, __int128 *value)
{
    int negative;
    unsigned long long magnitude;
    if (!scan_int(pp, end, &negative, &magnitude)) {
        return 0;
    }
    *value = negative ? -(__int128)magnitude : (__int128)magnitude;
    return 1;
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

PyDoc_STRVAR(add_text_doc,
"add_text(layout, totals, line, /) -> (new_totals, utc_timestamp_ms, missed) | None\n"
"\n"
"A Firecracker metrics line added into totals kept as JSON text, text to text.\n"
"\n"
"``totals`` is ``orjson.dumps(t)`` of totals ``t`` whose sections are\n"
"non-empty dicts of ints or of non-empty dicts of ints, and ``layout`` one\n"
"byte per integer leaf of ``t`` in order, non-zero where the leaf is a\n"
"gauge (fc_metrics_parse.text_layout). For a line in Firecracker's compact\n"
"form with ``t``'s sections, fields and agg keys in ``t``'s order, and no\n"
"sum beyond what orjson holds (-2**63 .. 2**64 - 1): ``orjson.dumps`` of\n"
"``t`` after ``merge_into(t, line without its timestamp)``, the line's\n"
"``utc_timestamp_ms`` and its ``logger.missed_metrics_count`` (0 without\n"
"one). Any other line (or totals): None.");

#define BOTH(c) (t < tend && *t == (c) && l < lend && *l == (c))
/* inside a loop over an object's members: on to the next, or out of the loop */
#define MEMBER_END()                                     \
    {                                                    \
        int more_ = next_member(&t, tend, &l, lend, &o); \
        if (more_ < 0) {                                 \
            goto refuse;                                 \
        }                                                \
        if (more_) {                                     \
            continue; /* the enclosing loop's */         \
        }                                                \
    }                                                    \
    break

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
            PyErr_Format(PyExc_TypeError, "add_text(): argument %d must be bytes, not %.100s",
                         i + 1, Py_TYPE(args[i])->tp_name);
            return NULL;
        }
    }
    const unsigned char *layout = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t leaves = PyBytes_GET_SIZE(args[0]), leaf = 0;
    const char *t = PyBytes_AS_STRING(args[1]), *tend = t + PyBytes_GET_SIZE(args[1]);
    const char *l = PyBytes_AS_STRING(args[2]), *lend = l + PyBytes_GET_SIZE(args[2]);

    if (lend - l < LINE_PREFIX_LEN || memcmp(l, LINE_PREFIX, LINE_PREFIX_LEN) != 0) {
        Py_RETURN_NONE;
    }
    l += LINE_PREFIX_LEN;
    __int128 timestamp, missed = 0;
    if (!scan_value(&l, lend, &timestamp)) {
        Py_RETURN_NONE;
    }
    /* each number written is at most one digit longer than the longer of the two
     * it sums, and every byte of the line's keys is room to spare: the two sizes
     * together always hold the result */
    PyObject *out = PyBytes_FromStringAndSize(NULL, (tend - t) + (lend - l));
    if (out == NULL) {
        return NULL;
    }
    char *o = PyBytes_AS_STRING(out);
    const char *key;
    Py_ssize_t key_len;
    if (t >= tend || *t != '{') {
        goto refuse;
    }
    t++;
    *o++ = '{';
    if (t < tend && *t == '}') { /* no sections yet: nor may the line have any */
        if (l >= lend || *l != '}') {
            goto refuse;
        }
        t++;
        l++;
        *o++ = '}';
        goto finished;
    }
    if (l >= lend || *l != ',') {
        goto refuse;
    }
    l++;
    for (;;) { /* sections */
        if (!same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
            goto refuse;
        }
        if (key_len == LINE_PREFIX_LEN - 4 && memcmp(key, LINE_PREFIX + 2, (size_t)key_len) == 0) {
            goto refuse; /* a second timestamp: the parse would keep that one */
        }
        int logger = key_len == 6 && memcmp(key, "logger", 6) == 0;
        if (!BOTH('{')) {
            goto refuse;
        }
        t++, l++, *o++ = '{';
        for (;;) { /* fields */
            if (!same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
                goto refuse;
            }
            int agg = BOTH('{');
            if (agg) {
                t++, l++, *o++ = '{';
            }
            int missed_field =
                !agg && logger && key_len == 20 && memcmp(key, "missed_metrics_count", 20) == 0;
            for (;;) { /* the field's one number, or an agg's subs */
                if (agg) {
                    if (!same_text_key(&t, tend, &l, lend, &o, &key, &key_len)) {
                        goto refuse;
                    }
                }
                __int128 before, number;
                if (leaf >= leaves || !scan_value(&t, tend, &before) ||
                    !scan_value(&l, lend, &number)) {
                    goto refuse;
                }
                __int128 value = layout[leaf++] ? number : before + number;
                if (value > (__int128)ULLONG_MAX || value < -((__int128)1 << 63)) {
                    goto refuse; /* the Python path keeps the exact sum */
                }
                if (missed_field) {
                    missed = number;
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
        goto refuse;
    }
    if (_PyBytes_Resize(&out, o - PyBytes_AS_STRING(out)) < 0) {
        return NULL;
    }
    PyObject *ts = signed_int(timestamp), *lost = ts == NULL ? NULL : signed_int(missed);
    PyObject *answer = lost == NULL ? NULL : PyTuple_Pack(3, out, ts, lost);
    Py_DECREF(out);
    Py_XDECREF(ts);
    Py_XDECREF(lost);
    return answer;
refuse:
    Py_DECREF(out);
    Py_RETURN_NONE;
}
#undef MEMBER_END
#undef BOTH

static PyMethodDef methods[] = {
    {"merge_into", (PyCFunction)(void (*)(void))merge_into, METH_FASTCALL, merge_into_doc},
    {"add_line", (PyCFunction)(void (*)(void))add_line, METH_FASTCALL, add_line_doc},
    {"add_text", (PyCFunction)(void (*)(void))add_text, METH_FASTCALL, add_text_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cellos_probed.probes._fc_sum",
    .m_doc = "Firecracker metrics lines summed in C: see merge_into, add_line and add_text.",
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
    if (zero == NULL) {
        zero = PyLong_FromLong(0);
        if (zero == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module_def);
}
