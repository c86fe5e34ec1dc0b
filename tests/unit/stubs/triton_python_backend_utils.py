"""Stand-in for Triton's triton_python_backend_utils, for the unit tests only.

It has just what the model's modules touch; calls are recorded for the tests to read.
"""

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonModelException(Exception):
    pass


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=UNKNOWN):
        self._message = message
        self._code = code

    def message(self):
        return self._message

    def code(self):
        return self._code


class Tensor:
    def __init__(self, name, array):
        self._name = name
        self._array = np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors = list(output_tensors or [])
        self.error = error

    def tensor(self, name):
        return next((t for t in self.output_tensors if t.name() == name), None)


class Logger:
    lines = []  # (level, message)

    @classmethod
    def log_info(cls, message):
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message):
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message):
        cls.lines.append(("error", message))


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)


class Metric:
    def __init__(self, family, labels, buckets=None):
        self.family = family
        self.labels = labels
        self.buckets = buckets
        self.calls = []  # (method, value)
        self.fail = 0  # how many of the next calls raise

    def _call(self, method, value):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("the server is unreachable")
        self.calls.append((method, value))

    def increment(self, value):
        self._call("increment", value)

    def set(self, value):
        self._call("set", value)

    def observe(self, value):
        self._call("observe", value)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created = {}  # name -> family

    def __init__(self, name, description, kind):
        self.name = name
        self.description = description
        self.kind = kind
        self.metrics = []
        MetricFamily.created[name] = self

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
        metric = Metric(self, labels, buckets)
        self.metrics.append(metric)
        return metric
