/* skattn's launcher: every kernel launch of a repeat call in one C call.

   A launch *spec* (bytes, built once per recipe by skattn/launcher.py) holds, per launch,
   the CUfunction, grid, block, shared memory, launch attributes and the kernel's parameter
   block with every constant already in place; a call passes the stream and the per-call
   pointers (integers, or tensors: their data_ptr()), which are written at their recorded
   offsets before cuLaunchKernelEx. The spec was made for one pattern of 16-byte alignment
   of the first `roles` pointers (Triton specialises kernels on it); a call whose pointers
   have another pattern launches nothing and gets None.

   `metas(*tensors)` reads what a call's signature keeps of each tensor (skattn/api.py):
   (shape, stride(), dtype, device, requires_grad), through torch's own getters, for plain
   torch.Tensor objects (None stays None; anything else: the result is None and Python
   reads them).

   Spec layout (native byte order, every record 8-byte aligned):
     header  u32 magic, u32 launches, u32 values (per-call pointers after the stream),
             u32 roles, u32 pattern (bit i: pointer i is not 16-byte aligned), u32 0
     launch  u64 function; u32 grid x, y, z, block x, shared bytes, pdl, cooperative,
             params, patches, data bytes;
             u32 (offset, size) per parameter; u32 (value index, offset) per patch;
             data bytes, padded to 8
*/
#include "cuda.h"
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAGIC 0x314c4b53u /* "SKL1" */
#define MAX_VALUES 64
#define MAX_PARAMS 256
#define MAX_DATA 4096

typedef CUresult (*launch_ex_t)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*ctx_get_t)(CUcontext *);
typedef CUresult (*err_str_t)(CUresult, const char **);

static PyObject *data_ptr_name = NULL;
/* torch.Tensor and TensorBase's getters and methods (`bind_torch`) */
static PyObject *tensor_type = NULL, *get_shape = NULL, *get_dtype = NULL, *get_device = NULL,
                *get_requires_grad = NULL, *stride_method = NULL, *data_ptr_method = NULL;
static launch_ex_t launch_ex = NULL;
static ctx_get_t ctx_get = NULL;
static err_str_t err_str = NULL;

enum mode { LAUNCH, PREPARE, DESCRIBE };

static int load_driver(void) {
  if (launch_ex != NULL)
    return 0;
  void *lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (lib == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "skattn launcher: cannot open libcuda.so.1");
    return -1;
  }
  ctx_get = (ctx_get_t)dlsym(lib, "cuCtxGetCurrent");
  err_str = (err_str_t)dlsym(lib, "cuGetErrorString");
  launch_ex = (launch_ex_t)dlsym(lib, "cuLaunchKernelEx");
  if (ctx_get == NULL || err_str == NULL || launch_ex == NULL) {
    launch_ex = NULL;
    PyErr_SetString(PyExc_RuntimeError, "skattn launcher: libcuda.so.1 lacks cuLaunchKernelEx");
    return -1;
  }
  return 0;
}

typedef struct {
  uint64_t function;
  uint32_t grid[3], block, shared, pdl, cooperative, params, patches, data;
} launch_head;

static PyObject *spec_error(const char *what) {
  PyErr_Format(PyExc_ValueError, "skattn launcher: bad launch spec (%s)", what);
  return NULL;
}

/* One parameter's bytes, for DESCRIBE. */
static PyObject *describe(const launch_head *h, CUstream stream, const char *buf,
                          const uint32_t *params) {
  PyObject *blob = PyList_New(h->params);
  if (blob == NULL)
    return NULL;
  for (uint32_t i = 0; i < h->params; i++) {
    PyObject *b = PyBytes_FromStringAndSize(buf + params[2 * i], params[2 * i + 1]);
    if (b == NULL) {
      Py_DECREF(blob);
      return NULL;
    }
    PyList_SET_ITEM(blob, i, b);
  }
  return Py_BuildValue("{s:K,s:(III),s:I,s:I,s:I,s:I,s:K,s:N}", "function",
                       (unsigned long long)h->function, "grid", h->grid[0], h->grid[1],
                       h->grid[2], "block", h->block, "shared", h->shared, "pdl", h->pdl,
                       "cooperative", h->cooperative, "stream",
                       (unsigned long long)(uintptr_t)stream, "params", blob);
}

/* Every launch record of the spec lies inside it, with its parameters and patches inside its
   data (64-bit sums: no wrap-around): checked before anything is launched. */
static int check_records(const char *spec, Py_ssize_t size, uint32_t launches, uint32_t nvalues) {
  Py_ssize_t at = 24;
  for (uint32_t l = 0; l < launches; l++) {
    launch_head h;
    if (at + (Py_ssize_t)sizeof h > size)
      return -1;
    memcpy(&h, spec + at, sizeof h);
    at += sizeof h;
    if (h.params > MAX_PARAMS || h.data > MAX_DATA)
      return -1;
    Py_ssize_t data_at = at + 8 * ((Py_ssize_t)h.params + h.patches);
    if (data_at + (Py_ssize_t)h.data > size)
      return -1;
    const uint32_t *offsets = (const uint32_t *)(spec + at);
    const uint32_t *patches = offsets + 2 * h.params;
    for (uint32_t i = 0; i < h.params; i++)
      if ((uint64_t)offsets[2 * i] + offsets[2 * i + 1] > h.data)
        return -1;
    for (uint32_t i = 0; i < h.patches; i++)
      if (patches[2 * i] >= nvalues || (uint64_t)patches[2 * i + 1] + 8 > h.data)
        return -1;
    at = data_at + ((h.data + 7) & ~(Py_ssize_t)7);
  }
  return at == size ? 0 : -1;
}

static PyObject *run(PyObject *const *args, Py_ssize_t nargs, enum mode mode) {
  if (nargs < 2 || !PyBytes_Check(args[0]))
    return spec_error("expected (spec, stream, *pointers)");
  const char *spec = PyBytes_AS_STRING(args[0]);
  Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
  const uint32_t *head = (const uint32_t *)spec;
  if (size < 24 || head[0] != MAGIC)
    return spec_error("header");
  uint32_t launches = head[1], nvalues = head[2], roles = head[3], pattern = head[4];
  if (nvalues > MAX_VALUES || roles > nvalues || roles > 32 || (Py_ssize_t)nvalues != nargs - 2)
    return spec_error("number of pointers");
  if (check_records(spec, size, launches, nvalues) < 0)
    return spec_error("launch record");
  uint64_t values[MAX_VALUES];
  CUstream stream = (CUstream)(uintptr_t)PyLong_AsUnsignedLongLong(args[1]);
  if (PyErr_Occurred())
    return NULL;
  uint32_t misaligned = 0;
  for (uint32_t i = 0; i < nvalues; i++) {
    PyObject *x = args[2 + i];
    if (PyLong_Check(x)) {
      values[i] = PyLong_AsUnsignedLongLong(x);
    } else {
      PyObject *ptr = (PyObject *)Py_TYPE(x) == tensor_type && data_ptr_method != NULL
                          ? PyObject_Vectorcall(data_ptr_method, &x, 1, NULL)
                          : PyObject_CallMethodNoArgs(x, data_ptr_name);
      if (ptr == NULL)
        return NULL;
      values[i] = PyLong_AsUnsignedLongLong(ptr);
      Py_DECREF(ptr);
    }
    if (PyErr_Occurred())
      return NULL;
    if (i < roles && values[i] % 16)
      misaligned |= 1u << i;
  }
  if (misaligned != pattern)
    Py_RETURN_NONE; /* other compiled kernels: the caller finds their spec */
  if (mode == LAUNCH) {
    if (load_driver() < 0)
      return NULL;
    CUcontext ctx = NULL;
    if (ctx_get(&ctx) != CUDA_SUCCESS || ctx == NULL)
      Py_RETURN_FALSE; /* no current context on this thread: the caller takes Triton's path */
  }
  PyObject *described = mode == DESCRIBE ? PyList_New(0) : NULL;
  if (mode == DESCRIBE && described == NULL)
    return NULL;
  _Alignas(16) char buf[MAX_DATA];
  void *params[MAX_PARAMS];
  Py_ssize_t at = 24;
  for (uint32_t l = 0; l < launches; l++) { /* the records were checked above */
    launch_head h;
    memcpy(&h, spec + at, sizeof h);
    at += sizeof h;
    Py_ssize_t data_at = at + 8 * ((Py_ssize_t)h.params + h.patches);
    const uint32_t *offsets = (const uint32_t *)(spec + at);
    const uint32_t *patches = offsets + 2 * h.params;
    memcpy(buf, spec + data_at, h.data);
    for (uint32_t i = 0; i < h.patches; i++)
      memcpy(buf + patches[2 * i + 1], &values[patches[2 * i]], 8);
    for (uint32_t i = 0; i < h.params; i++)
      params[i] = buf + offsets[2 * i];
    at = data_at + ((h.data + 7) & ~(Py_ssize_t)7);
    if (mode == DESCRIBE) {
      PyObject *d = describe(&h, stream, buf, offsets);
      if (d == NULL || PyList_Append(described, d) < 0) {
        Py_XDECREF(d);
        Py_DECREF(described);
        return NULL;
      }
      Py_DECREF(d);
      continue;
    }
    if (mode == PREPARE || (uint64_t)h.grid[0] * h.grid[1] * h.grid[2] == 0)
      continue;
    CUlaunchAttribute attrs[2];
    unsigned nattrs = 0;
    if (h.pdl) {
      attrs[nattrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[nattrs].value.programmaticStreamSerializationAllowed = 1;
      nattrs++;
    }
    if (h.cooperative) {
      attrs[nattrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[nattrs].value.cooperative = 1;
      nattrs++;
    }
    CUlaunchConfig config = {0};
    config.gridDimX = h.grid[0];
    config.gridDimY = h.grid[1];
    config.gridDimZ = h.grid[2];
    config.blockDimX = h.block;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = h.shared;
    config.hStream = stream;
    config.attrs = attrs;
    config.numAttrs = nattrs;
    CUresult status;
    Py_BEGIN_ALLOW_THREADS;
    status = launch_ex(&config, (CUfunction)(uintptr_t)h.function, params, NULL);
    Py_END_ALLOW_THREADS;
    if (status != CUDA_SUCCESS) {
      const char *text = NULL;
      err_str(status, &text);
      PyErr_Format(PyExc_RuntimeError, "skattn launcher: cuLaunchKernelEx failed: %s (%d)",
                   text ? text : "unknown error", (int)status);
      return NULL;
    }
  }
  if (mode == DESCRIBE)
    return described;
  Py_RETURN_TRUE;
}

static PyObject *bind_torch(PyObject *self, PyObject *args) {
  PyObject *objs[7];
  if (!PyArg_ParseTuple(args, "OOOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                        &objs[5], &objs[6]))
    return NULL;
  for (int i = 1; i < 5; i++)
    if (Py_TYPE(objs[i])->tp_descr_get == NULL)
      return PyErr_Format(PyExc_TypeError, "bind_torch: argument %d is not a getter", i);
  PyObject **slots[7] = {&tensor_type, &get_shape, &get_dtype, &get_device, &get_requires_grad,
                         &stride_method, &data_ptr_method};
  for (int i = 0; i < 7; i++) {
    Py_INCREF(objs[i]);
    Py_XSETREF(*slots[i], objs[i]);
  }
  Py_RETURN_NONE;
}

static PyObject *get(PyObject *getter, PyObject *x) {
  return Py_TYPE(getter)->tp_descr_get(getter, x, (PyObject *)Py_TYPE(x));
}

static PyObject *metas(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  if (tensor_type == NULL)
    Py_RETURN_NONE;
  PyObject *result = PyTuple_New(nargs);
  if (result == NULL)
    return NULL;
  for (Py_ssize_t i = 0; i < nargs; i++) {
    PyObject *x = args[i], *m;
    if (x == Py_None) {
      m = Py_NewRef(Py_None);
    } else if ((PyObject *)Py_TYPE(x) == tensor_type) {
      m = PyTuple_New(5);
      if (m == NULL) {
        Py_DECREF(result);
        return NULL;
      }
      for (int j = 0; j < 5; j++) { /* one getter at a time: none runs after an error */
        PyObject *part = j == 1 ? PyObject_Vectorcall(stride_method, &x, 1, NULL)
                                : get(j == 0 ? get_shape : j == 2 ? get_dtype
                                              : j == 3 ? get_device : get_requires_grad, x);
        if (part == NULL) {
          Py_DECREF(m);
          Py_DECREF(result);
          return NULL;
        }
        PyTuple_SET_ITEM(m, j, part);
      }
    } else {
      Py_DECREF(result);
      Py_RETURN_NONE; /* a subclass or another type: Python reads it */
    }
    PyTuple_SET_ITEM(result, i, m);
  }
  return result;
}

static PyObject *launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  return run(args, nargs, LAUNCH);
}

static PyObject *prepare(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  return run(args, nargs, PREPARE);
}

static PyObject *describe_launches(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  return run(args, nargs, DESCRIBE);
}

static PyMethodDef methods[] = {
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL,
     "launch(spec, stream, *pointers) -> True; False with no current CUDA context, None for "
     "pointers of another alignment (nothing launched)"},
    {"prepare", (PyCFunction)(void (*)(void))prepare, METH_FASTCALL,
     "prepare(spec, stream, *pointers) -> True: everything but the driver call"},
    {"bind_torch", bind_torch, METH_VARARGS,
     "bind_torch(Tensor, shape, dtype, device, requires_grad getters, stride, data_ptr)"},
    {"metas", (PyCFunction)(void (*)(void))metas, METH_FASTCALL,
     "metas(*tensors) -> ((shape, stride, dtype, device, requires_grad) or None, ...), or None"},
    {"describe", (PyCFunction)(void (*)(void))describe_launches, METH_FASTCALL,
     "describe(spec, stream, *pointers) -> [dict]: each launch's config and parameter bytes"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "skattn_launcher", NULL, -1, methods};

PyMODINIT_FUNC PyInit_skattn_launcher(void) {
  data_ptr_name = PyUnicode_InternFromString("data_ptr");
  if (data_ptr_name == NULL)
    return NULL;
  return PyModule_Create(&module);
}
