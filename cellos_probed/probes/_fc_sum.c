/*
 * cellos_probed.probes._fc_sum: one Firecracker metrics line added into a
 * running total, in place, in C.
 *
 *     merge_into(gauge_cache, is_gauge, agg_gauges, cache_limit, total, new) -> None
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
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "merge_into() takes exactly 6 positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    Config cfg = {args[0], args[1], args[2], 0};
    PyObject *total = args[4], *new = args[5];
    if (!PyDict_CheckExact(cfg.gauge_cache)) {
        PyErr_Format(PyExc_TypeError, "merge_into(): gauge_cache must be a dict, not %.100s",
                     Py_TYPE(cfg.gauge_cache)->tp_name);
        return NULL;
    }
    if (!PyCallable_Check(cfg.is_gauge)) {
        PyErr_Format(PyExc_TypeError, "merge_into(): is_gauge must be callable, not %.100s",
                     Py_TYPE(cfg.is_gauge)->tp_name);
        return NULL;
    }
    if (!PyLong_Check(args[3])) {
        PyErr_Format(PyExc_TypeError, "merge_into(): cache_limit must be an int, not %.100s",
                     Py_TYPE(args[3])->tp_name);
        return NULL;
    }
    int overflow;
    cfg.cache_limit = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (overflow) {
        cfg.cache_limit = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    }
    else if (cfg.cache_limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
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

static PyMethodDef methods[] = {
    {"merge_into", (PyCFunction)(void (*)(void))merge_into, METH_FASTCALL, merge_into_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cellos_probed.probes._fc_sum",
    .m_doc = "Firecracker metrics lines summed in C: see merge_into.",
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
