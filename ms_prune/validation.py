"""The one argument-validation helper of ms_prune: every public constructor and function checks
its arguments with these, so errors read alike: ``Owner: name must be ..., got value (type)``.

``owner`` names the class or function the user called (what they will look for in their code).
"""
import difflib
import math
import numbers

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "check_instance", "check_keys",
           "check_like", "check_ranges", "check_amount_or_percent"]


def _got(value):
    return f"got {value!r} ({type(value).__name__})"


def check_int(owner, name, value, minimum=None, maximum=None, allow_none=False):
    """An int (not a bool) in [minimum, maximum]; returns it as a Python int (or None)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int{' or None' if allow_none else ''}, {_got(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: {name} must be an int in [{minimum if minimum is not None else '-inf'}, "
                         f"{maximum if maximum is not None else 'inf'}], {_got(value)}")
    return int(value)


def check_number(owner, name, value, minimum=None, maximum=None, min_open=False, max_open=False,
                 allow_none=False):
    """A finite real number (not a bool) in the given interval (open ends with ``*_open``);
    returns it as a float (or None). A string such as '1e-4' is refused by name: settings files
    go through ``check_like``, which converts them where the default is a float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{owner}: {name} must be a finite number{' or None' if allow_none else ''}, {_got(value)}")
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if min_open else value < minimum)
    high_bad = maximum is not None and (value >= maximum if max_open else value > maximum)
    if low_bad or high_bad:
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{owner}: {name} must be in {'(' if min_open else '['}{low}, {high}"
                         f"{')' if max_open else ']'}, {_got(value)}")
    return value


def check_bool(owner, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, {_got(value)}")
    return value


def check_choice(owner, name, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, {_got(value)}")
    return value


def check_instance(owner, name, value, types, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{owner}: {name} must be a {names}{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    return value


def check_keys(owner, mapping, allowed, required=(), path=""):
    """A dict whose keys are among ``allowed`` and include ``required``; ``path`` (e.g.
    'algorithms.pld') prefixes the key names in the error."""
    where = f"{path}." if path else ""
    if not isinstance(mapping, dict):
        raise TypeError(f"{owner}: {path or 'the settings'} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        close = {k: difflib.get_close_matches(k, [str(a) for a in allowed], n=1) for k in unknown}
        hints = "".join(f" ('{where}{k}': did you mean '{where}{m[0]}'?)" for k, m in close.items() if m)
        raise ValueError(f"{owner}: unknown key(s) {[where + k for k in unknown]}; allowed at "
                         f"{path or 'the top level'}: {sorted(allowed)}{hints}")
    missing = sorted(k for k in required if k not in mapping)
    if missing:
        raise ValueError(f"{owner}: missing key(s) {[where + k for k in missing]}")
    return mapping


def check_like(owner, value, default, path="", fill_missing=True):
    """Check a settings tree (a YAML file's) against a default tree of the same form, at every
    depth; returns the checked tree with ``float`` values for float settings.

    Mappings: keys as in the default (an unknown or misspelled key names its dotted path and the
    allowed keys); missing keys take the default's value when ``fill_missing``. Leaves take the
    default's type: a bool must be a bool, an int an int, a str a str; a float setting also takes
    an int or a number string such as '1e-4' (PyYAML reads ``1e-4`` as a string; YAML 1.1 wants
    ``1.0e-4``). Lists: each item like the default's first item. A None default takes anything:
    its user checks it.
    """
    name = path or "the settings"
    if default is None:
        return value
    if isinstance(default, dict):
        check_keys(owner, value, default, () if fill_missing else tuple(default), path)
        checked = {k: check_like(owner, v, default[k], f"{path}.{k}" if path else str(k), fill_missing)
                   for k, v in value.items()}
        return {**{k: v for k, v in default.items() if fill_missing and k not in checked}, **checked}
    if isinstance(default, list):
        if not isinstance(value, list):
            raise TypeError(f"{owner}: {name} must be a list like {default!r}, {_got(value)}")
        return [check_like(owner, item, default[0], f"{path}[{i}]", fill_missing) if default else item
                for i, item in enumerate(value)]
    if isinstance(default, bool):
        return check_bool(owner, name, value)
    if isinstance(default, numbers.Integral):
        return check_int(owner, name, value)
    if isinstance(default, numbers.Real):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"{owner}: {name} must be a number, {_got(value)}") from None
        return check_number(owner, name, value)
    if isinstance(default, str):
        return check_instance(owner, name, value, str)
    return value


def check_ranges(owner, tree, ranges):
    """``ranges``: {dotted path: (minimum, maximum)} or (minimum, maximum, 'open') for a minimum
    that is excluded (a learning rate > 0); None = unbounded; a list's items are each checked.
    Ints stay ints (``check_int``), other numbers go through ``check_number``."""
    for path, (low, high, *open_low) in ranges.items():
        node = tree
        for part in path.split("."):
            node = node[part]
        items = node if isinstance(node, list) else [node]
        for i, item in enumerate(items):
            name = f"{path}[{i}]" if isinstance(node, list) else path
            if isinstance(item, numbers.Integral) and not isinstance(item, bool):
                check_int(owner, name, item, low + 1 if open_low and low is not None else low, high)
            elif item is not None:
                check_number(owner, name, item, low, high, min_open=bool(open_low))
    return tree


def check_amount_or_percent(owner, name, value):
    """A positive number (an absolute amount) or a string 'P%' with 0 < P <= 100 (a share of a
    reference). Returns (amount, None) or (None, P / 100)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            percent = float(text[:-1]) if text.endswith("%") else None
        except ValueError:
            percent = None
        if percent is None or not math.isfinite(percent) or not 0 < percent <= 100:
            raise ValueError(f"{owner}: {name} must be a positive number or a percentage such as '60%' "
                             f"(0 < P <= 100), {_got(value)}")
        return None, percent / 100.0
    return check_number(owner, name, value, minimum=0, min_open=True), None


def deprecated_alias(function, old_name):
    """``function`` under the name an earlier release gave it: same behaviour, plus a
    ``DeprecationWarning`` naming the new name, so old code keeps running while it moves."""
    import functools
    import warnings

    @functools.wraps(function)
    def alias(*args, **kwargs):
        warnings.warn(f"{old_name} is deprecated: use {function.__name__}", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)
    alias.__name__ = alias.__qualname__ = old_name
    return alias
