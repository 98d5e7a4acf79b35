"""The metric names a PromQL expression selects, for checking dashboards and alert rules
against the metrics the services export (tests/test_dashboards.py).

A tokenizer, not a full parser: it skips strings, numbers, durations (``[5m]``,
``[$__rate_interval]``, ``offset 1h``), Grafana variables (``$node``, ``${node}``),
label matchers (``{...}``, except ``__name__="..."``, which names a metric), the label
lists of ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right``, function
and aggregation names (an identifier followed by ``(``; an unknown one is an error, so a
typo cannot pass as a function), keywords and operators. Every other identifier is a
metric name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
FUNCTIONS = (
    frozenset(
        [
            "abs",
            "absent",
            "absent_over_time",
            "acos",
            "acosh",
            "asin",
            "asinh",
            "atan",
            "atanh",
            "avg_over_time",
            "ceil",
            "changes",
            "clamp",
            "clamp_max",
            "clamp_min",
            "cos",
            "cosh",
            "count_over_time",
            "day_of_month",
            "day_of_week",
            "day_of_year",
            "days_in_month",
            "deg",
            "delta",
            "deriv",
            "exp",
            "floor",
            "histogram_avg",
            "histogram_count",
            "histogram_fraction",
            "histogram_quantile",
            "histogram_stddev",
            "histogram_stdvar",
            "histogram_sum",
            "holt_winters",
            "double_exponential_smoothing",
            "hour",
            "idelta",
            "increase",
            "irate",
            "label_join",
            "label_replace",
            "last_over_time",
            "ln",
            "log10",
            "log2",
            "mad_over_time",
            "max_over_time",
            "min_over_time",
            "minute",
            "month",
            "pi",
            "predict_linear",
            "present_over_time",
            "quantile_over_time",
            "rad",
            "rate",
            "resets",
            "round",
            "scalar",
            "sgn",
            "sin",
            "sinh",
            "sort",
            "sort_desc",
            "sort_by_label",
            "sort_by_label_desc",
            "sqrt",
            "stddev_over_time",
            "stdvar_over_time",
            "sum_over_time",
            "tan",
            "tanh",
            "time",
            "timestamp",
            "vector",
            "year",
        ]
    )
    | AGGREGATIONS
)
KEYWORDS = frozenset(["and", "or", "unless", "bool", "offset", "atan2", "start", "end", "inf", "nan"])
LABEL_LIST_KEYWORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_DURATION = re.compile(r"(?:\d+(?:ms|[smhdwy]))+")
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[a-zA-Z0-9_]+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r"""__name__\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


class PromQLError(ValueError):
    """An expression this checker cannot read (or a function PromQL does not have)."""


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects."""
    names: set[str] = set()
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"'`":
            m = _STRING.match(expr, i)
            if not m:
                raise PromQLError(f"unterminated string at {i}: {expr[i : i + 20]!r}")
            i = m.end()
        elif c == "$":
            m = _VARIABLE.match(expr, i)
            if not m:
                raise PromQLError(f"bad variable at {i}: {expr[i : i + 20]!r}")
            i = m.end()
        elif c == "{":
            end = _matching(expr, i, "{", "}")
            names |= _names_in_matchers(expr[i + 1 : end])
            i = end + 1
        elif c == "[":  # a range or subquery duration
            i = _matching(expr, i, "[", "]") + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = _DURATION.match(expr, i) or _NUMBER.match(expr, i)
            assert m is not None
            i = m.end()
        elif c == "_" or c == ":" or c.isalpha():
            m = _IDENT.match(expr, i)
            assert m is not None
            word, i = m.group(), m.end()
            j = _skip_space(expr, i)
            followed_by_paren = j < n and expr[j] == "("
            lower = word.lower()
            if lower in LABEL_LIST_KEYWORDS:
                if followed_by_paren:
                    i = _matching(expr, j, "(", ")") + 1
            elif lower in KEYWORDS:
                if lower == "offset":  # offset 5m, offset -1h
                    k = _skip_space(expr, i)
                    if k < n and expr[k] == "-":
                        k += 1
                    m2 = _DURATION.match(expr, k) or _VARIABLE.match(expr, k)
                    if m2:
                        i = m2.end()
            elif word in AGGREGATIONS:  # sum (...), sum by (x) (...), sum without (x) (...)
                pass
            elif followed_by_paren:
                if word not in FUNCTIONS:
                    raise PromQLError(f"unknown function {word!r}")
            else:
                names.add(word)
        elif c == "@" or c in "()+-*/%^=!<>,~":  # @ <timestamp> | @ start() | @ end()
            i += 1
        else:
            raise PromQLError(f"unexpected {c!r} at {i} in {expr!r}")
    return names


def _skip_space(expr: str, i: int) -> int:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i


def _matching(expr: str, start: int, open_: str, close: str) -> int:
    """The index of the bracket closing the one at `start` (strings inside are skipped)."""
    depth, i = 0, start
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            m = _STRING.match(expr, i)
            if not m:
                raise PromQLError(f"unterminated string at {i}")
            i = m.end()
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise PromQLError(f"unbalanced {open_!r} at {start} in {expr!r}")


def _names_in_matchers(body: str) -> set[str]:
    names = set()
    for m in _NAME_MATCHER.finditer(body):
        op, value = m.group(1), m.group(2)[1:-1]
        if op != "=":
            raise PromQLError(f"__name__{op}{value!r}: a pattern cannot be checked against the exported metrics")
        names.add(value)
    return names


def unknown_metrics(exprs: Iterable[str], exported: set[str]) -> dict[str, set[str]]:
    """Each expression naming a metric that is not in `exported`, with those names."""
    out = {}
    for expr in exprs:
        missing = metric_names(expr) - exported
        if missing:
            out[expr] = missing
    return out
