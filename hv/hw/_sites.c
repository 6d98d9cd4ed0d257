/* One Unicorn code hook for every address hv hooks (hv.hw.engine).
 *
 * Unicorn counts instructions (emu_start's count) with a code hook on every
 * instruction, and its helper then walks the whole list of code hooks, so
 * each hooked address costs every instruction a little (tens of hooks made
 * hv's counted runs ten times slower than counting alone: BENCHMARKS.md).
 * hv registers this one hook instead: a lookup in an open-addressing table
 * of the hooked addresses, which calls back into Python only on a hit.
 *
 * The module's HOOK is the hook function's address; Python owns the table.
 */
#include <Python.h>
#include <stdint.h>

typedef void (*hv_site_fn)(void *uc, uint64_t address, uint32_t size, void *data);

/* Laid out as hv.hw.engine._Sites. A slot holds address + 1 (0 is empty);
 * an address's first slot is (address * FIB) >> shift, then the next ones. */
struct hv_sites {
    uint64_t *slots;
    uint64_t shift;
    hv_site_fn site;
};

#define FIB 0x9E3779B97F4A7C15ull

static void hv_sites_hook(void *uc, uint64_t address, uint32_t size, void *data)
{
    struct hv_sites *s = data;
    uint64_t mask = (~0ull) >> s->shift;
    uint64_t i = (address * FIB) >> s->shift;
    for (;;) {
        uint64_t slot = s->slots[i];
        if (slot == address + 1) {
            s->site(uc, address, size, NULL);
            return;
        }
        if (slot == 0)
            return;
        i = (i + 1) & mask;
    }
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sites", "One Unicorn code hook for every address hv hooks.", -1,
};

PyMODINIT_FUNC PyInit__sites(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObject(m, "HOOK", PyLong_FromVoidPtr((void *)hv_sites_hook)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
