"""A restricted unpickler for dataset pickles that may be hostile (private).

:func:`load_restricted` rebuilds numpy arrays, dtypes and scalars, dicts, lists,
strings, bytes and numbers, and nothing else, and cannot be made to build much
more than the file holds:

- Any global other than numpy's pickle helpers, ``dict``, ``list``,
  ``bytearray`` and ``_codecs.encode`` is refused, never imported or called.
- The allowed callables accept only the arguments that pickles of real data
  use, because each can otherwise allocate memory the file does not hold:
  ``numpy.ndarray`` is only a marker that ``_reconstruct`` accepts (called, it
  allocates an uninitialised array of any shape, whose garbage would load as
  data); ``_reconstruct`` only builds the empty array numpy's ``__reduce__``
  writes; ``_codecs.encode`` only encodes a string to latin-1 (chained ``hex``
  encodings double a string each time); ``bytearray``, ``list`` and ``dict``
  only copy an existing object.
- Object dtypes are refused: setting an object array's state allocates its
  whole shape, then reads items past the end of a short list (numpy 2.4
  segfaults). A dtype's state is set at most once, and never after an array
  or scalar was made with it.
- Every byte those callables build is charged to a budget of
  ``4 * file size + 64 MiB``, so an object memoised once and copied many times
  cannot multiply the file's content.
- The pure-Python unpickler runs, not the C one: the C unpickler resizes (and
  zero-fills) its memo up to the largest index a PUT opcode names, so an
  eight-byte pickle can make it allocate gigabytes; here the memo is a dict.
  Reads never ask for more than the file has left, and ``BYTEARRAY8`` checks
  its length against the file before allocating (the pure-Python default
  zero-fills whatever length the file declares).

What is left to the caller: containers may share references (a list holding
the same list a thousand times costs the file a few bytes), so code that walks
the result must check the structure it expects without expanding it.
"""

from __future__ import annotations

import codecs
import os
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

_BUDGET_FACTOR = 4
_BUDGET_SLACK = 64 << 20
_LATIN1 = ("latin1", "latin-1")
_POINTER_BYTES = 8

_reconstruct = np.empty(0).__reduce__()[0]
_frombuffer = np.empty(0).__reduce_ex__(5)[0]
_scalar = np.float64(0).__reduce__()[0]


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something :func:`load_restricted` does not allow."""


class _NDArrayMarker:
    """Stands for ``numpy.ndarray`` in a pickle: an argument, never a callable."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RefusedPickle(
            "refusing to call numpy.ndarray (it allocates an uninitialised array "
            "of any shape); numpy's own pickles only pass it to _reconstruct"
        )


class _BoundedReader:
    """A file reader whose reads never ask for more than the file has left."""

    def __init__(self, file: BinaryIO, size: int):
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._file.readline()
        self._left -= len(line)
        return line

    def readinto(self, buf: bytearray) -> int:
        with memoryview(buf) as view:
            n = self._file.readinto(view[: min(len(buf), self._left)])
        self._left -= n
        return n

    @property
    def left(self) -> int:
        return self._left


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, size: int):
        self._reader = _BoundedReader(file, size)
        super().__init__(self._reader, encoding="latin1")
        self._size = size
        self._budget = _BUDGET_FACTOR * size + _BUDGET_SLACK
        # dtypes in use (by id; the values keep them alive): BUILD may not change
        # one after an array or scalar has been made with it.
        self._used_dtypes: dict[int, np.dtype] = {}
        self._allowed = {
            ("numpy", "ndarray"): _NDArrayMarker,
            ("numpy", "dtype"): self._dtype,
            ("builtins", "dict"): self._dict,
            ("builtins", "list"): self._list,
            ("builtins", "bytearray"): self._bytearray,
            # Protocol 2 stores bytes (an array's raw data) as _codecs.encode(str).
            ("_codecs", "encode"): self._encode,
        }
        # numpy's pickle helpers moved from numpy.core to numpy._core in numpy 2.
        for module in ("numpy.core", "numpy._core"):
            self._allowed[(f"{module}.multiarray", "_reconstruct")] = self._empty
            self._allowed[(f"{module}.multiarray", "scalar")] = self._scalar
            self._allowed[(f"{module}.numeric", "_frombuffer")] = self._frombuffer

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refusing to load global {module}.{name!s}") from None

    def _charge(self, nbytes: int) -> None:
        self._budget -= nbytes
        if self._budget < 0:
            limit = _BUDGET_FACTOR * self._size + _BUDGET_SLACK
            raise RefusedPickle(
                f"refusing to build more than {limit} bytes from a {self._size}-byte "
                "file (the same data copied over and over)"
            )

    def _empty(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDArrayMarker or shape != (0,) or dtype not in (b"b", "b"):
            raise RefusedPickle(
                f"refusing numpy _reconstruct with shape {shape!r}: numpy's pickles "
                "reconstruct an empty array and then set its state"
            )
        return _reconstruct(np.ndarray, (0,), b"b")

    def _dtype(self, obj: Any, align: bool = False, copy: bool = True) -> np.dtype:
        del copy  # always a copy: BUILD then sets its state, never a shared one's
        dtype = np.dtype(obj, align=bool(align), copy=True)
        _refuse_objects(dtype)
        return dtype

    def _use(self, dtype: np.dtype) -> None:
        _refuse_objects(dtype)
        self._used_dtypes[id(dtype)] = dtype

    def _scalar(self, dtype: Any, *data: Any) -> Any:
        if not isinstance(dtype, np.dtype):
            raise RefusedPickle(f"refusing numpy scalar of dtype {dtype!r}")
        self._use(dtype)
        self._charge(dtype.itemsize)
        return _scalar(dtype, *data)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
        if not isinstance(buf, bytes | bytearray) or not isinstance(dtype, np.dtype):
            raise RefusedPickle("refusing numpy _frombuffer of anything but bytes")
        self._use(dtype)
        self._charge(len(buf))
        return _frombuffer(buf, dtype, shape, order)

    def _encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in _LATIN1:
            raise RefusedPickle(
                f"refusing _codecs.encode of a {type(text).__name__} to "
                f"{encoding!r}; pickles only encode strings to latin-1"
            )
        self._charge(len(text))
        return codecs.encode(text, "latin1")

    def _bytearray(self, *args: Any) -> bytearray:
        if args and isinstance(args[0], str):
            args = (self._encode(*args),)
        if len(args) > 1 or (args and not isinstance(args[0], bytes | bytearray)):
            raise RefusedPickle(
                "refusing bytearray() of anything but bytes (bytearray(n) "
                "allocates n bytes)"
            )
        self._charge(len(args[0]) if args else 0)
        return bytearray(*args)

    def _list(self, *args: Any) -> list:
        if len(args) > 1 or (args and not isinstance(args[0], list | tuple)):
            raise RefusedPickle("refusing list() of anything but a list or tuple")
        self._charge(_POINTER_BYTES * len(args[0]) if args else 0)
        return list(*args)

    def _dict(self, *args: Any) -> dict:
        if len(args) > 1 or (args and not isinstance(args[0], dict | list | tuple)):
            raise RefusedPickle("refusing dict() of anything but a dict or pairs")
        self._charge(3 * _POINTER_BYTES * len(args[0]) if args else 0)
        return dict(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            # numpy writes (version, shape, dtype, is_fortran, data); 4-tuples
            # without the version come from older numpys.
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise RefusedPickle("refusing an ndarray state numpy does not write")
            dtype, data = state[-3], state[-1]
            if not isinstance(dtype, np.dtype):
                raise RefusedPickle(f"refusing an ndarray state with dtype {dtype!r}")
            self._use(dtype)
            if not isinstance(data, bytes | bytearray | str):
                raise RefusedPickle("refusing an ndarray state without raw data")
            self._charge(len(data))
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype):
            if id(inst) in self._used_dtypes:  # arrays would change under us
                raise RefusedPickle("refusing to change a numpy dtype once used")
            inst.__setstate__(state)
            self._use(inst)  # set once
        else:
            raise RefusedPickle(f"refusing to set the state of a {type(inst).__name__}")

    def _load_bytearray8(self) -> None:
        # The pure-Python default allocates (and zero-fills) the declared length
        # before reading; here it must first be in the file.
        (size,) = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame
        if frame is not None:
            with frame.getbuffer() as view:
                in_frame = frame.tell() < view.nbytes
            if in_frame:  # frames hold small objects only; copy from the frame
                data = self.read(size)
                if len(data) != size:
                    raise pickle.UnpicklingError("pickle data was truncated")
                self._charge(size)
                self.append(bytearray(data))
                return
        if size > self._reader.left:
            raise pickle.UnpicklingError("pickle data was truncated")
        self._charge(size)
        buf = bytearray(size)
        if self._reader.readinto(buf) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(buf)

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


def _refuse_objects(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise RefusedPickle(
            f"refusing numpy dtype {dtype} (it holds Python objects, not data)"
        )


def load_restricted(file: BinaryIO) -> Any:
    """Unpickles ``file`` (open for binary reading) as the module docstring says.

    Raises:
      RefusedPickle: the pickle asks for a global, an argument or an amount of
        memory that is not allowed; nothing it asked for was done.
      pickle.UnpicklingError, EOFError, ValueError, TypeError, ...: the file is
        not a well-formed pickle (truncated, corrupted).
    """
    size = os.fstat(file.fileno()).st_size - file.tell()
    return _RestrictedUnpickler(file, size).load()
