// A torch tensor as the C++ extensions read it, without linking libtorch: pointer, sizes and
// strides (in elements), read through the tensor's Python methods with the C API.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace tensor_view {

namespace py = pybind11;

// A torch tensor as the kernel reads it: the pointer, sizes and strides (in elements), read
// through its Python methods with the C API (names interned once). Nothing is converted or copied:
// turning each tensor into a NumPy array cost four dispatched ops per tensor (30% of a batch-1
// step's ops), and pybind11's generic attribute calls and list casts about 2 us per tensor.
std::vector<int64_t> int_tuple(PyObject* tuple) {  // a torch.Size or a tuple of ints
    if (tuple == nullptr) throw py::error_already_set();
    if (!PyTuple_Check(tuple)) {
        Py_DECREF(tuple);
        throw std::invalid_argument("expected a tensor: its shape / stride() is not a tuple");
    }
    std::vector<int64_t> out(static_cast<size_t>(PyTuple_GET_SIZE(tuple)));
    for (size_t i = 0; i < out.size(); ++i) out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i)));
    Py_DECREF(tuple);
    return out;
}

struct Tensor {
    char* data = nullptr;
    std::vector<int64_t> shape, strides;
    int64_t itemsize = 0;

    Tensor() = default;
    explicit Tensor(const py::handle& t) {
        static PyObject* const data_ptr_name = PyUnicode_InternFromString("data_ptr");
        static PyObject* const shape_name = PyUnicode_InternFromString("shape");
        static PyObject* const stride_name = PyUnicode_InternFromString("stride");
        static PyObject* const element_size_name = PyUnicode_InternFromString("element_size");
        const auto call = [&](PyObject* name) {
            PyObject* r = PyObject_CallMethodNoArgs(t.ptr(), name);
            if (r == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(r);
        };
        data = reinterpret_cast<char*>(PyLong_AsVoidPtr(call(data_ptr_name).ptr()));
        itemsize = PyLong_AsLongLong(call(element_size_name).ptr());
        shape = int_tuple(PyObject_GetAttr(t.ptr(), shape_name));
        strides = int_tuple(PyObject_CallMethodNoArgs(t.ptr(), stride_name));
        if (PyErr_Occurred()) throw py::error_already_set();
    }

    template <class T>  // the element at [i0, i1, i2, 0...] (indices past the tensor's dimensions ignored)
    T* at(int64_t i0, int64_t i1 = 0, int64_t i2 = 0) const {
        int64_t offset = i0 * strides[0];
        if (strides.size() > 1) offset += i1 * strides[1];
        if (strides.size() > 2) offset += i2 * strides[2];
        return reinterpret_cast<T*>(data) + offset;
    }
};

}  // namespace tensor_view
