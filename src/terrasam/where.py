"""Safe expressions over named columns: ``--where`` filters and ``--index`` band formulas.

An expression is parsed with Python's :mod:`ast` and checked against a whitelist before
anything runs: numbers, strings, column names, arithmetic (``+ - * / // % **``),
comparisons (``< <= > >= == != in``, chained), ``and`` / ``or`` / ``not`` (also written
``AND`` / ``OR`` / ``NOT``; a single ``=`` reads as ``==``), and a few functions
(:data:`FUNCTIONS`). Nothing is ever passed to ``eval``: the tree is walked with numpy
operations on whole columns. Unknown names and anything else (attributes, calls to other
functions, subscripts, lambdas, ...) are refused with a one-sentence :class:`TerrasamError`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable, Mapping

import numpy as np

from terrasam.errors import TerrasamError

__all__ = ["Expression", "parse", "FUNCTIONS"]

FUNCTIONS = {
    "abs": np.abs, "sqrt": np.sqrt, "log": np.log, "log10": np.log10, "exp": np.exp,
    "min": np.minimum, "max": np.maximum, "where": np.where, "isnan": np.isnan,
}
_ARITY = {"min": 2, "max": 2, "where": 3}

_BINARY = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.true_divide,
    ast.FloorDiv: np.floor_divide, ast.Mod: np.mod, ast.Pow: np.power,
}
_COMPARE = {
    ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal,
    ast.Eq: np.equal, ast.NotEq: np.not_equal,
}
_WORDS = {"AND": "and", "OR": "or", "NOT": "not", "IN": "in", "TRUE": "True",
          "FALSE": "False"}


class Expression:
    """A checked expression: ``names`` it reads, ``evaluate(columns)`` on arrays."""

    def __init__(self, text: str, tree: ast.Expression, names: frozenset, what: str):
        self.text = text
        self._tree = tree
        self.names = names
        self._what = what

    def __repr__(self):
        return f"Expression({self.text!r})"

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The expression over ``columns`` (arrays of one length), as an array."""
        with np.errstate(all="ignore"):
            return np.asarray(self._eval(self._tree.body, columns))

    def mask(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """Rows that satisfy a filter (a boolean array of length ``n``; NaN compares False)."""
        value = self.evaluate(columns)
        if value.dtype != bool:
            raise TerrasamError(
                f"{self._what} {self.text!r} must be a condition (a comparison such as "
                f"area_m2 > 50), not a value.")
        return np.broadcast_to(value, (n,)).copy()

    def _eval(self, node, cols):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return cols[node.id]
        if isinstance(node, ast.BoolOp):
            values = [np.asarray(self._eval(v, cols), dtype=bool) for v in node.values]
            op = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = values[0]
            for v in values[1:]:
                out = op(out, v)
            return out
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, cols)
            if isinstance(node.op, ast.Not):
                return np.logical_not(np.asarray(value, dtype=bool))
            return np.negative(value) if isinstance(node.op, ast.USub) else np.positive(value)
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, cols), self._eval(node.right, cols)
            return _BINARY[type(node.op)](_numeric(left), _numeric(right))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, cols)
            out = None
            for op, comparator in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    options = [c.value for c in comparator.elts]
                    result = np.isin(np.asarray(left), np.asarray(options, dtype=object)
                                     if any(isinstance(o, str) for o in options) else options)
                    if isinstance(op, ast.NotIn):
                        result = ~result
                    right = None
                else:
                    right = self._eval(comparator, cols)
                    result = _COMPARE[type(op)](np.asarray(left, dtype=_kind(left, right)),
                                                np.asarray(right, dtype=_kind(right, left)))
                out = result if out is None else np.logical_and(out, result)
                left = right
            return out
        if isinstance(node, ast.Call):
            args = [self._eval(a, cols) for a in node.args]
            if node.func.id == "where":
                return np.where(np.asarray(args[0], dtype=bool), args[1], args[2])
            return FUNCTIONS[node.func.id](*[_numeric(a) for a in args])
        raise AssertionError(f"unchecked node {type(node).__name__}")  # parse() refuses it


def _numeric(value):
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "US":
        raise TerrasamError("text columns can only be compared (==, !=, in), not used in "
                            "arithmetic.")
    return array


def _kind(value, other):
    """Compare text with text and numbers with numbers (object arrays stay objects)."""
    array = np.asarray(value)
    if array.dtype == object or isinstance(value, str):
        return object
    if isinstance(other, str) or np.asarray(other).dtype == object:
        return object
    return None


def _normalise(text: str) -> str:
    """SQL-style spellings: AND/OR/NOT/IN words and a single ``=`` as ``==``."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text
    out = []
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.string in _WORDS:
            tok = tok._replace(string=_WORDS[tok.string])
        elif tok.type == tokenize.OP and tok.string == "=":
            tok = tok._replace(string="==")
        out.append((tok.type, tok.string))
    return tokenize.untokenize(out)


def parse(text: str, names: Iterable[str], *, what: str = "expression",
          condition: bool = False, text_columns: Iterable[str] = ()) -> Expression:
    """Parse and check ``text`` against the known column ``names``.

    ``what`` names the expression in messages (e.g. "--where"); ``condition``: it must be a
    filter (comparisons joined by and/or/not), not a value; ``text_columns``: columns holding
    text, which may be compared but not computed with. Raises TerrasamError for syntax
    errors, unknown names and anything outside the whitelist.
    """
    names = list(names)
    text = str(text).strip()
    if not text:
        raise TerrasamError(f"the {what} expression is empty.")
    try:
        tree = ast.parse(_normalise(text), mode="eval")
    except SyntaxError as exc:
        raise TerrasamError(f"cannot read the {what} expression {text!r} "
                            f"({exc.msg}).") from None
    used: set[str] = set()
    calls: set[int] = set()  # the Name nodes that are called (function names)
    for node in ast.walk(tree):
        _check(node, text, what, used, calls)
    unknown = sorted(used - set(names))
    if unknown:
        known = ", ".join(names) if names else "none"
        raise TerrasamError(
            f"the {what} expression {text!r} uses unknown column "
            f"{', '.join(repr(u) for u in unknown)}; the known columns are: {known}.")
    texts = set(text_columns)
    for node in ast.walk(tree):
        operands = [node.left, node.right] if isinstance(node, ast.BinOp) else \
            node.args if isinstance(node, ast.Call) else []
        for o in operands:
            if isinstance(o, ast.Name) and o.id in texts:
                raise TerrasamError(f"{o.id} holds text, which can only be compared (==, !=, "
                                    f"in) in the {what} expression {text!r}.")
    if condition and not _is_condition(tree.body):
        raise TerrasamError(f"the {what} expression {text!r} must be a condition (a "
                            f"comparison such as area_m2 > 50), not a value.")
    return Expression(text, tree, frozenset(used), what)


_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
            ast.UAdd, ast.BinOp, ast.Compare, ast.Name, ast.Load, ast.Constant, ast.Call,
            ast.Tuple, ast.List, ast.In, ast.NotIn, *_BINARY, *_COMPARE)


def _check(node, text, what, used, calls):
    if not isinstance(node, _ALLOWED):
        raise TerrasamError(f"the {what} expression {text!r} uses "
                            f"{_describe(node)}, which is not allowed; use column names, "
                            f"numbers, arithmetic, comparisons and and/or/not.")
    if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
        raise TerrasamError(f"the {what} expression {text!r} uses the constant "
                            f"{node.value!r}, which is not allowed.")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise TerrasamError(f"the {what} expression {text!r} uses "
                                f"{_describe(node.func)}, which is not allowed; use column "
                                f"names, numbers, arithmetic, comparisons and and/or/not.")
        name = node.func.id
        if name not in FUNCTIONS or node.keywords:
            raise TerrasamError(f"the {what} expression {text!r} calls {name}; the functions "
                                f"allowed are {', '.join(FUNCTIONS)}.")
        calls.add(id(node.func))
        if len(node.args) != _ARITY.get(name, 1):
            raise TerrasamError(f"{name}() takes {_ARITY.get(name, 1)} argument"
                                f"{'s' if _ARITY.get(name, 1) > 1 else ''} in the {what} "
                                f"expression {text!r}.")
    if isinstance(node, ast.Compare):
        for op, comparator in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)) and not (
                    isinstance(comparator, (ast.Tuple, ast.List))
                    and all(isinstance(e, ast.Constant) for e in comparator.elts)):
                raise TerrasamError(f"'in' takes a list of values, e.g. prompt_type in "
                                    f"('point', 'box'), in the {what} expression {text!r}.")
    if isinstance(node, (ast.Tuple, ast.List)):
        return  # only as the right side of 'in' (checked above); elements are walked too
    if isinstance(node, ast.Name) and id(node) not in calls:
        used.add(node.id)


def _describe(node) -> str:
    kinds = {ast.Attribute: "an attribute (.)", ast.Subscript: "a subscript ([])",
             ast.Lambda: "a lambda", ast.IfExp: "if/else", ast.NamedExpr: "an assignment",
             ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Invert: "~",
             ast.MatMult: "@", ast.Is: "is", ast.IsNot: "is not"}
    for kind, label in kinds.items():
        if isinstance(node, kind):
            return label
    return re.sub(r"(?<!^)(?=[A-Z])", " ", type(node).__name__).lower()


def _is_condition(node) -> bool:
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.BoolOp):
        return all(_is_condition(v) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _is_condition(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id == "isnan"
    return False
