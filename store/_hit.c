/*
 * The readers' local hit (store/readers.py) in C, for ProjectOptions.get_value and
 * GroupMeta.get_value. Optional: when this module is not built, the readers keep their Python
 * method, which stays the reference and is what every case but a hit is handed to here.
 *
 * A Python method call is most of a hit's cost (about three bare dict.get calls before its
 * body does anything). A HitMethod is a method descriptor, so ``reader.get_value(id, key)``
 * calls it like a builtin method, with no frame and no bound-method object. It does exactly
 * the Python hit path:
 *
 *     if type(ident) is int:
 *         default not given:  return self.<reads>[ident][key]             if both are present
 *         default given:      return self.<values>[ident].get(key, default)  if ident is
 *         a miss:             return <python miss path>(self, ident, key, default or UNSET)
 *     anything else:          return <python get_value>(self, ident, key[, default])
 *
 * Keyword arguments, a wrong number of arguments, a subclass-less type mismatch and every miss
 * go to the Python method with the arguments unchanged, and a miss to the method the Python
 * one hands its misses to (``_read``), so its errors and its miss path are the only ones
 * there are. The two maps are read from the reader's __slots__ by offset (the
 * offsets are taken from the class's member descriptors when the HitMethod is made, and the
 * reader's type is checked on every call before they are used).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyTypeObject *owner;     /* the reader class the offsets belong to */
    Py_ssize_t reads_at;     /* offset of the slot: id -> values over the declared defaults */
    Py_ssize_t values_at;    /* offset of the slot: id -> values */
    PyObject *unset;         /* the UNSET sentinel: no default given */
    PyObject *slow;          /* the Python get_value (a plain function taking self) */
    PyObject *miss;          /* the Python miss path: miss(self, ident, key, default) */
    vectorcallfunc vectorcall;
} HitMethod;

static inline PyObject *
slot_dict(PyObject *reader, Py_ssize_t offset)
{
    PyObject *value = *(PyObject **)((char *)reader + offset);
    return (value != NULL && PyDict_CheckExact(value)) ? value : NULL;
}

static PyObject *
HitMethod_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    HitMethod *self = (HitMethod *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* args: reader, ident, key[, default] */
    if (kwnames == NULL && (nargs == 3 || nargs == 4) && PyLong_CheckExact(args[1])
        && PyObject_TypeCheck(args[0], self->owner)) {
        PyObject *reader = args[0], *ident = args[1], *key = args[2];
        PyObject *value = NULL;
        if (nargs == 3 || args[3] == self->unset) {
            PyObject *reads = slot_dict(reader, self->reads_at);
            PyObject *scope = reads ? PyDict_GetItemWithError(reads, ident) : NULL;
            if (scope != NULL && PyDict_CheckExact(scope)) {
                value = PyDict_GetItemWithError(scope, key);
            }
        }
        else {
            PyObject *values = slot_dict(reader, self->values_at);
            PyObject *scope = values ? PyDict_GetItemWithError(values, ident) : NULL;
            if (scope != NULL && PyDict_CheckExact(scope)) {
                value = PyDict_GetItemWithError(scope, key);
                if (value == NULL && !PyErr_Occurred()) {
                    value = args[3];
                }
            }
        }
        if (value != NULL) {
            return Py_NewRef(value);
        }
        if (!PyErr_Occurred()) {
            /* A miss: straight to where the Python method's own miss goes. */
            PyObject *miss_args[4] = {reader, ident, key, nargs == 4 ? args[3] : self->unset};
            return PyObject_Vectorcall(self->miss, miss_args, 4, NULL);
        }
        /* an unhashable key: the Python method raises what it raises */
        PyErr_Clear();
    }
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static int
member_offset(PyTypeObject *owner, PyObject *name, Py_ssize_t *offset)
{
    PyObject *descr = _PyType_Lookup(owner, name); /* borrowed; along the MRO */
    if (descr == NULL) {
        PyErr_Format(PyExc_TypeError, "HitMethod: %s has no slot %R", owner->tp_name, name);
        return -1;
    }
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "HitMethod: %s.%U is not a slot", owner->tp_name, name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "HitMethod: %s.%U is not an object slot", owner->tp_name,
                     name);
        return -1;
    }
    *offset = member->offset;
    return 0;
}

static PyObject *
HitMethod_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyTypeObject *owner;
    PyObject *reads_name, *values_name, *unset, *slow, *miss;
    static char *names[] = {"owner", "reads", "values", "unset", "slow", "miss", NULL};
    Py_ssize_t reads_at, values_at;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!UUOOO:HitMethod", names, &PyType_Type,
                                     &owner, &reads_name, &values_name, &unset, &slow, &miss)) {
        return NULL;
    }
    if (!PyFunction_Check(slow) || !PyFunction_Check(miss)) {
        PyErr_SetString(PyExc_TypeError, "HitMethod: slow and miss must be Python functions");
        return NULL;
    }
    if (member_offset(owner, reads_name, &reads_at) < 0
        || member_offset(owner, values_name, &values_at) < 0) {
        return NULL;
    }
    HitMethod *self = (HitMethod *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->owner = (PyTypeObject *)Py_NewRef(owner);
    self->reads_at = reads_at;
    self->values_at = values_at;
    self->unset = Py_NewRef(unset);
    self->slow = Py_NewRef(slow);
    self->miss = Py_NewRef(miss);
    self->vectorcall = HitMethod_vectorcall;
    return (PyObject *)self;
}

static int
HitMethod_traverse(HitMethod *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->unset);
    Py_VISIT(self->slow);
    Py_VISIT(self->miss);
    return 0;
}

static int
HitMethod_clear(HitMethod *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->unset);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->miss);
    return 0;
}

static void
HitMethod_dealloc(HitMethod *self)
{
    PyObject_GC_UnTrack(self);
    HitMethod_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
HitMethod_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

/* What help() and inspect show: the Python method's. */
static PyObject *
HitMethod_getattro(PyObject *self, PyObject *name)
{
    PyObject *found = PyObject_GenericGetAttr(self, name);
    if (found == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return PyObject_GetAttr(((HitMethod *)self)->slow, name);
    }
    return found;
}

static PyObject *
HitMethod_get_slow(HitMethod *self, void *closure)
{
    return Py_NewRef(self->slow);
}

static PyObject *
HitMethod_get_doc(HitMethod *self, void *closure)
{
    return PyObject_GetAttrString(self->slow, "__doc__");
}

static PyGetSetDef HitMethod_getset[] = {
    {"slow", (getter)HitMethod_get_slow, NULL, "the Python method (everything but a hit)",
     NULL},
    {"__doc__", (getter)HitMethod_get_doc, NULL, NULL, NULL},
    /* inspect.signature() follows it to the Python method's signature */
    {"__wrapped__", (getter)HitMethod_get_slow, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject HitMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "store._hit.HitMethod",
    .tp_basicsize = sizeof(HitMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(HitMethod, vectorcall),
    .tp_new = HitMethod_new,
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)HitMethod_traverse,
    .tp_clear = (inquiry)HitMethod_clear,
    .tp_dealloc = (destructor)HitMethod_dealloc,
    .tp_descr_get = HitMethod_descr_get,
    .tp_getattro = HitMethod_getattro,
    .tp_getset = HitMethod_getset,
};

static struct PyModuleDef hitmodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "store._hit",
    .m_doc = PyDoc_STR("The readers' local hit in C (optional; see store/readers.py)."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__hit(void)
{
    if (PyType_Ready(&HitMethodType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&hitmodule);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "HitMethod", (PyObject *)&HitMethodType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
