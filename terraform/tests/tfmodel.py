"""Reads this repository's Terraform modules with python-hcl2 and evaluates their expressions.

Not a Terraform: there is no provider here (no init, validate or plan), so the tests read what the
modules *declare* and evaluate it the way Terraform would for the values that are knowable before
an apply: literals, variables (their defaults, or values given), locals, string templates,
conditionals, for expressions and the functions the modules use. A reference to something only an
apply knows (a resource's id, a data source) evaluates to a Ref, unless the caller binds it (a
test account id, a region).

    m = load_module(ROOT / "modules/controller")
    ev = m.evaluator({"certificate_arn": "arn:..."})
    asg = m.resource("aws_autoscaling_group", "controller")
    ev.eval(asg["min_size"])                      # 1
    [ev.eval(t["key"]) for t in asg["tag"]]        # ["jbake:role", "Name"]

An expression the evaluator does not understand raises EvalError naming it: a module that wants
a value read by the tests keeps that value simple.
"""

import ipaddress
import json
import os
import re
from pathlib import Path

import hcl2

# ------------------------------------------------------------------ loading


class Module:
    """The blocks of one module folder (every *.tf file in it)."""

    def __init__(self, path):
        self.path = Path(path)
        self.variables = {}
        self.locals = {}
        self.resources = {}
        self.data = {}
        self.modules = {}
        self.outputs = {}
        self.where = {}
        for f in sorted(self.path.glob("*.tf")):
            doc = parse_cached(f.read_text())
            for block in doc.get("variable", []):
                for name, body in block.items():
                    self.variables[unquote_label(name)] = body
            for block in doc.get("locals", []):
                for name, value in block.items():
                    if not name.startswith("__"):
                        self.locals[name] = value
            for kind, store in (("resource", self.resources), ("data", self.data)):
                for block in doc.get(kind, []):
                    for rtype, named in block.items():
                        for rname, body in named.items():
                            key = (unquote_label(rtype), unquote_label(rname))
                            store[key] = body
                            self.where[(kind,) + key] = f.name
            for block in doc.get("module", []):
                for name, body in block.items():
                    self.modules[unquote_label(name)] = body
            for block in doc.get("output", []):
                for name, body in block.items():
                    self.outputs[unquote_label(name)] = body

    def resource(self, rtype, name):
        try:
            return self.resources[(rtype, name)]
        except KeyError:
            raise KeyError(f"{self.path.name}: no resource {rtype}.{name}") from None

    def resources_of(self, rtype):
        return {name: body for (t, name), body in self.resources.items() if t == rtype}

    def datum(self, dtype, name):
        try:
            return self.data[(dtype, name)]
        except KeyError:
            raise KeyError(f"{self.path.name}: no data source {dtype}.{name}") from None

    def evaluator(self, values=None, refs=None):
        return Evaluator(self, values or {}, refs or {})


_PARSED = {}


def parse_cached(text):
    """hcl2.loads, once per distinct file content (the mutation tests parse the same files often).
    Returns a deep copy, so a caller cannot change the cache."""
    if text not in _PARSED:
        _PARSED[text] = json.dumps(hcl2.loads(text))
    return json.loads(_PARSED[text])


def load_module(path):
    return Module(path)


def unquote_label(s):
    return s[1:-1] if len(s) >= 2 and s[0] == '"' and s[-1] == '"' else s


def block_attrs(body):
    """A block's attributes without python-hcl2's markers."""
    return {k: v for k, v in body.items() if not k.startswith("__")}


def lifecycle_ignores(body):
    """The ignore_changes list of a resource's lifecycle block, as written ("launch_template[0].version")."""
    out = []
    for lc in body.get("lifecycle", []):
        for item in lc.get("ignore_changes", []):
            if isinstance(item, str) and item.startswith("${") and item.endswith("}"):
                item = item[2:-1]
            out.append(item)
    return out


# ------------------------------------------------------------------ values


class EvalError(Exception):
    pass


class Ref:
    """A value only an apply knows: the reference as written."""

    def __init__(self, path):
        self.path = path

    def __eq__(self, other):
        return isinstance(other, Ref) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    def __repr__(self):
        return f"<{self.path}>"


class Unknown:
    """An expression over a Ref."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"<unknown: {self.text}>"


def is_known(v):
    if isinstance(v, (Ref, Unknown)):
        return False
    if isinstance(v, list):
        return all(is_known(x) for x in v)
    if isinstance(v, dict):
        return all(is_known(x) for x in v.values())
    return True


# ------------------------------------------------------------------ expression parser

TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>\d+(\.\d+)?([eE][+-]?\d+)?)
  | (?P<str>")
  | (?P<op>==|!=|<=|>=|&&|\|\||=>|\.\.\.|[-+*/%<>!?:.,()\[\]{}=])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
    """,
    re.VERBOSE,
)


def scan_string(text, i):
    """Reads a quoted template starting after its opening quote; returns (parts, next index).
    parts: list of str (literal) and ("expr", source)."""
    parts, buf = [], []
    while i < len(text):
        c = text[i]
        if c == '"':
            if buf:
                parts.append("".join(buf))
            return parts, i + 1
        if c == "\\":
            nxt = text[i + 1]
            buf.append({"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}.get(nxt, nxt))
            i += 2
            continue
        if text.startswith("${", i) or text.startswith("%{", i):
            if text[i] == "%":
                raise EvalError(f"template directives (%{{) are not supported: {text}")
            if buf:
                parts.append("".join(buf))
                buf = []
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise EvalError(f"unterminated interpolation in {text}")
                if text[j] == '"':
                    _, j = scan_string(text, j + 1)
                    continue
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            parts.append(("expr", text[i + 2 : j - 1]))
            i = j
            continue
        buf.append(c)
        i += 1
    raise EvalError(f"unterminated string in {text}")


def tokenize(text):
    toks, i = [], 0
    while i < len(text):
        m = TOKEN.match(text, i)
        if not m:
            raise EvalError(f"cannot read {text[i:i + 20]!r} in {text!r}")
        kind = m.lastgroup
        if kind == "ws":
            i = m.end()
            continue
        if kind == "str":
            parts, i = scan_string(text, m.end())
            toks.append(("str", parts))
            continue
        toks.append((kind, m.group(kind)))
        i = m.end()
    toks.append(("end", None))
    return toks


class Parser:
    """HCL expressions into tuples: ("lit", v), ("tmpl", parts), ("ref", root, [steps]),
    ("call", name, args, expand), ("op", op, a, b), ("not", a), ("neg", a), ("cond", c, a, b),
    ("tuple", items), ("object", [(k, v)]), ("for_list", k, v, coll, body, cond),
    ("for_map", k, v, coll, key, val, cond)."""

    def __init__(self, text):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    def peek(self, value=None):
        kind, v = self.toks[self.i]
        return v if value is None else (v == value and kind in ("op", "ident"))

    def take(self, value=None):
        kind, v = self.toks[self.i]
        if value is not None and v != value:
            raise EvalError(f"expected {value!r} at token {self.i} of {self.text!r}, found {v!r}")
        self.i += 1
        return kind, v

    def parse(self):
        e = self.expr()
        if self.toks[self.i][0] != "end":
            raise EvalError(f"unexpected {self.toks[self.i][1]!r} in {self.text!r}")
        return e

    def expr(self):
        c = self.binary(0)
        if self.peek("?"):
            self.take("?")
            a = self.expr()
            self.take(":")
            b = self.expr()
            return ("cond", c, a, b)
        return c

    LEVELS = [["||"], ["&&"], ["==", "!="], ["<", ">", "<=", ">="], ["+", "-"], ["*", "/", "%"]]

    def binary(self, level):
        if level == len(self.LEVELS):
            return self.unary()
        a = self.binary(level + 1)
        while self.toks[self.i][0] == "op" and self.toks[self.i][1] in self.LEVELS[level]:
            _, op = self.take()
            b = self.binary(level + 1)
            a = ("op", op, a, b)
        return a

    def unary(self):
        if self.peek("!"):
            self.take()
            return ("not", self.unary())
        if self.peek("-"):
            self.take()
            return ("neg", self.unary())
        return self.postfix(self.primary())

    def postfix(self, e):
        while True:
            if self.peek("."):
                self.take()
                if self.peek("*"):
                    self.take()
                    e = ("splat", e, [])
                    continue
                kind, v = self.take()
                if kind == "num":
                    e = ("index", e, ("lit", int(v)))
                else:
                    e = ("attr", e, v)
            elif self.peek("["):
                self.take()
                if self.peek("*"):
                    self.take()
                    self.take("]")
                    e = ("splat", e, [])
                    continue
                idx = self.expr()
                self.take("]")
                e = ("index", e, idx)
            else:
                return e

    def primary(self):
        kind, v = self.toks[self.i]
        if kind == "num":
            self.take()
            return ("lit", float(v) if ("." in v or "e" in v.lower()) else int(v))
        if kind == "str":
            self.take()
            return ("tmpl", v)
        if v == "(":
            self.take()
            e = self.expr()
            self.take(")")
            return e
        if v == "[":
            self.take()
            if self.peek("for"):
                return self.for_expr("]")
            items = []
            while not self.peek("]"):
                items.append(self.expr())
                if self.peek(","):
                    self.take()
            self.take("]")
            return ("tuple", items)
        if v == "{":
            self.take()
            if self.peek("for"):
                return self.for_expr("}")
            items = []
            while not self.peek("}"):
                k = self.expr()
                if not (self.peek("=") or self.peek(":")):
                    raise EvalError(f"expected = in an object in {self.text!r}")
                self.take()
                items.append((k, self.expr()))
                if self.peek(","):
                    self.take()
            self.take("}")
            return ("object", items)
        if kind == "ident":
            self.take()
            if v in ("true", "false"):
                return ("lit", v == "true")
            if v == "null":
                return ("lit", None)
            if self.peek("("):
                self.take()
                args, expand = [], False
                while not self.peek(")"):
                    args.append(self.expr())
                    if self.peek("..."):
                        self.take()
                        expand = True
                    if self.peek(","):
                        self.take()
                self.take(")")
                return ("call", v, args, expand)
            return ("var", v)
        raise EvalError(f"unexpected {v!r} in {self.text!r}")

    def for_expr(self, close):
        self.take("for")
        _, a = self.take()
        b = None
        if self.peek(","):
            self.take()
            _, b = self.take()
        self.take("in")
        coll = self.expr()
        self.take(":")
        if close == "]":
            body = self.expr()
            cond = None
            if self.peek("if"):
                self.take()
                cond = self.expr()
            self.take("]")
            return ("for_list", a, b, coll, body, cond)
        key = self.expr()
        self.take("=>")
        val = self.expr()
        cond = None
        if self.peek("if"):
            self.take()
            cond = self.expr()
        self.take("}")
        return ("for_map", a, b, coll, key, val, cond)


# ------------------------------------------------------------------ evaluation


def _cidrsubnet(prefix, newbits, netnum):
    net = ipaddress.ip_network(prefix)
    return str(list(net.subnets(prefixlen_diff=newbits))[netnum])


FUNCTIONS = {
    "merge": lambda *ms: {k: v for m in ms for k, v in (m or {}).items()},
    "concat": lambda *ls: [x for l in ls for x in l],
    "length": len,
    "toset": lambda l: sorted(set(l), key=str),
    "tolist": list,
    "tostring": lambda v: v if isinstance(v, str) else json.dumps(v),
    "tonumber": lambda v: float(v) if "." in str(v) else int(v),
    "keys": lambda m: sorted(m.keys()),
    "values": lambda m: [m[k] for k in sorted(m)],
    "flatten": lambda l: [y for x in l for y in (x if isinstance(x, list) else [x])],
    "contains": lambda l, v: v in l,
    "alltrue": lambda l: all(l),
    "anytrue": lambda l: any(l),
    "coalesce": lambda *a: next(x for x in a if x is not None and x != ""),
    "one": lambda l: None if len(l) == 0 else l[0],
    "slice": lambda l, a, b: l[a:b],
    "range": lambda *a: list(range(*a)),
    "cidrsubnet": _cidrsubnet,
    "trimsuffix": lambda s, suf: s[: -len(suf)] if suf and s.endswith(suf) else s,
    "basename": os.path.basename,
    "regexall": lambda pat, s: re.findall(pat, s),
    "can": None,  # special-cased
    "regex": lambda pat, s: re.search(pat, s).group(0),
    "setproduct": lambda *ls: [list(t) for t in __import__("itertools").product(*ls)],
    "jsonencode": lambda v: json.dumps(v, separators=(",", ":")),
    "lookup": lambda m, k, d=None: m.get(k, d),
    "substr": lambda s, o, n: s[o : o + n],
    "format": lambda f, *a: re.sub(r"%[sd]", "{}", f).format(*a),
}


STRUCTURAL = {"merge", "concat", "flatten", "tolist", "length", "one", "slice", "keys", "values"}


class Evaluator:
    def __init__(self, module, values, refs):
        self.module = module
        self.values = values
        self.refs = refs
        self.local_cache = {}
        self.scopes = [{}]

    # values as python-hcl2 gives them (attributes, lists, dicts, quoted strings, "${...}")
    def eval(self, raw, scope=None):
        if scope:
            self.scopes.append(scope)
        try:
            return self._eval_raw(raw)
        finally:
            if scope:
                self.scopes.pop()

    def _eval_raw(self, raw):
        if raw is None or isinstance(raw, (bool, int, float)):
            return raw
        if isinstance(raw, list):
            return [self._eval_raw(x) for x in raw]
        if isinstance(raw, dict):
            return {unquote_label(k): self._eval_raw(v) for k, v in raw.items() if not k.startswith("__")}
        if isinstance(raw, str):
            if raw.startswith('"'):
                return self.expr(raw)
            if raw.startswith("${") and raw.endswith("}"):
                return self.expr(raw[2:-1])
            return self.expr(raw)  # a bare traversal
        raise EvalError(f"cannot evaluate {raw!r}")

    def expr(self, text):
        return self.ev(Parser(text).parse(), text)

    def variable(self, name):
        if name in self.values:
            return self.values[name]
        var = self.module.variables.get(name)
        if var is None:
            raise EvalError(f"{self.module.path.name}: no variable {name}")
        if "default" not in var:
            return Ref(f"var.{name}")
        return self._eval_raw(var["default"])

    def local(self, name):
        if name not in self.local_cache:
            if name not in self.module.locals:
                raise EvalError(f"{self.module.path.name}: no local {name}")
            self.local_cache[name] = self._eval_raw(self.module.locals[name])
        return self.local_cache[name]

    def ref(self, path):
        if path in self.refs:
            return self.refs[path]
        return Ref(path)

    def traverse_root(self, e):
        """Resolves var./local./path./data.X.Y/resource references to a value or a Ref."""
        steps = []
        while e[0] in ("attr", "index", "splat"):
            steps.append(e)
            e = e[1]
        steps.reverse()
        name = e[1]
        for scope in reversed(self.scopes):
            if name in scope:
                value = scope[name]
                return self.apply_steps(value, steps, name)
        if name == "var":
            return self.apply_steps(self.variable(steps[0][2]), steps[1:], f"var.{steps[0][2]}")
        if name == "local":
            return self.apply_steps(self.local(steps[0][2]), steps[1:], f"local.{steps[0][2]}")
        if name == "path" and steps and steps[0][2] == "module":
            return self.apply_steps(str(self.module.path), steps[1:], "path.module")
        # resource, data source, module, each, count: as far as the caller bound them
        text, rest = name, list(steps)
        while rest:
            s = rest[0]
            if s[0] == "attr":
                text += "." + s[2]
            elif s[0] == "index":
                idx = self.ev(s[2], "")
                if not is_known(idx):
                    break
                text += f"[{json.dumps(idx)}]"
            else:
                text += "[*]"
            rest.pop(0)
            if text in self.refs:
                return self.apply_steps(self.refs[text], rest, text)
        return Ref(text)

    def apply_steps(self, value, steps, text):
        for s in steps:
            if isinstance(value, (Ref, Unknown)):
                return Unknown(text)
            if s[0] == "attr":
                if not isinstance(value, dict) or s[2] not in value:
                    raise EvalError(f"{text} has no attribute {s[2]}")
                value = value[s[2]]
                text += "." + s[2]
            elif s[0] == "index":
                idx = self.ev(s[2], text)
                if not is_known(idx):
                    return Unknown(text)
                value = value[idx]
                text += f"[{idx!r}]"
            else:
                value = value if isinstance(value, list) else ([] if value is None else [value])
        return value

    def ev(self, e, text):
        kind = e[0]
        if kind == "lit":
            return e[1]
        if kind == "tmpl":
            out = []
            for p in e[1]:
                if isinstance(p, str):
                    out.append(p)
                else:
                    v = self.expr(p[1])
                    if not is_known(v):
                        return Unknown(text)
                    out.append(v if isinstance(v, str) else json.dumps(v) if not isinstance(v, (int, float)) else str(v))
            return "".join(out)
        if kind in ("var", "attr", "index", "splat"):
            return self.traverse_root(e)
        if kind == "tuple":
            return [self.ev(x, text) for x in e[1]]
        if kind == "object":
            out = {}
            for k, v in e[1]:
                key = k[1] if k[0] == "var" else self.ev(k, text)
                out[key] = self.ev(v, text)
            return out
        if kind == "not":
            v = self.ev(e[1], text)
            return Unknown(text) if not is_known(v) else (not v)
        if kind == "neg":
            v = self.ev(e[1], text)
            return Unknown(text) if not is_known(v) else -v
        if kind == "cond":
            c = self.ev(e[1], text)
            if not is_known(c):
                return Unknown(text)
            return self.ev(e[2] if c else e[3], text)
        if kind == "op":
            op = e[1]
            a = self.ev(e[2], text)
            if op == "&&" and is_known(a) and not a:
                return False
            if op == "||" and is_known(a) and a:
                return True
            b = self.ev(e[3], text)
            if op in ("==", "!=") and (isinstance(a, Ref) or isinstance(b, Ref)) and (a is None or b is None):
                # a reference to a resource attribute is never null in these modules' use
                return Unknown(text)
            if not (is_known(a) and is_known(b)):
                return Unknown(text)
            return {
                "==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b, ">": lambda: a > b,
                "<=": lambda: a <= b, ">=": lambda: a >= b, "+": lambda: a + b, "-": lambda: a - b,
                "*": lambda: a * b, "/": lambda: a / b, "%": lambda: a % b,
                "&&": lambda: a and b, "||": lambda: a or b,
            }[op]()
        if kind == "call":
            name, args, expand = e[1], e[2], e[3]
            if name == "can":
                try:
                    v = self.ev(args[0], text)
                    return True if is_known(v) else Unknown(text)
                except Exception:
                    return False
            if name == "fileset":
                base, pattern = self.ev(args[0], text), self.ev(args[1], text)
                return sorted(str(p.relative_to(base)) for p in Path(base).glob(pattern))
            if name == "file":
                return Path(self.ev(args[0], text)).read_text()
            if name not in FUNCTIONS:
                raise EvalError(f"function {name}() is not known to tfmodel.py (in {text!r})")
            vals = [self.ev(a, text) for a in args]
            if expand:
                vals = vals[:-1] + list(vals[-1])
            if name in STRUCTURAL:
                # lists and maps whose elements may be Refs: the structure is still known
                if any(isinstance(v, (Ref, Unknown)) for v in vals):
                    return Unknown(text)
            elif not all(is_known(v) for v in vals):
                return Unknown(text)
            return FUNCTIONS[name](*vals)
        if kind == "for_list":
            _, a, b, coll, body, cond = e
            c = self.ev(coll, text)
            if not is_known(c):
                return Unknown(text)
            out = []
            for k, v in (c.items() if isinstance(c, dict) else enumerate(c)):
                scope = {a: v} if b is None else {a: k, b: v}
                self.scopes.append(scope)
                try:
                    if cond is None or self.ev(cond, text):
                        out.append(self.ev(body, text))
                finally:
                    self.scopes.pop()
            return out
        if kind == "for_map":
            _, a, b, coll, key, val, cond = e
            c = self.ev(coll, text)
            if not is_known(c):
                return Unknown(text)
            out = {}
            for k, v in (c.items() if isinstance(c, dict) else enumerate(c)):
                scope = {a: v} if b is None else {a: k, b: v}
                self.scopes.append(scope)
                try:
                    if cond is None or self.ev(cond, text):
                        out[self.ev(key, text)] = self.ev(val, text)
                finally:
                    self.scopes.pop()
            return out
        raise EvalError(f"cannot evaluate {e[0]} in {text!r}")

    # ------------------------------------------------------------------ helpers for blocks

    def block(self, body, scope=None):
        """A block's attributes, evaluated (nested blocks stay raw lists)."""
        out = {}
        for k, v in block_attrs(body).items():
            if isinstance(v, list) and v and isinstance(v[0], dict) and v[0].get("__is_block__"):
                out[k] = v
            else:
                out[k] = self.eval(v, scope)
        return out

    def for_each_keys(self, body):
        """The instance keys of a resource: for_each keys, count indexes, or [None]."""
        if "for_each" in body:
            v = self.eval(body["for_each"])
            if not is_known(v):
                return Unknown("for_each")
            return list(v.keys()) if isinstance(v, dict) else list(v)
        if "count" in body:
            n = self.eval(body["count"])
            return Unknown("count") if not is_known(n) else list(range(n))
        return [None]

    def instances(self, body):
        """(key, scope) for each instance of a resource: each.key/each.value or count.index."""
        if "for_each" in body:
            v = self.eval(body["for_each"])
            if not is_known(v):
                raise EvalError(f"for_each is not known before an apply: {body['for_each']}")
            items = v.items() if isinstance(v, dict) else [(x, x) for x in v]
            return [(k, {"each": {"key": k, "value": val}}) for k, val in items]
        if "count" in body:
            n = self.eval(body["count"])
            if not is_known(n):
                raise EvalError(f"count is not known before an apply: {body['count']}")
            return [(i, {"count": {"index": i}}) for i in range(n)]
        return [(None, {})]

    def dynamic(self, body, name, scope=None):
        """The blocks a dynamic "name" block makes, each as (content raw, scope)."""
        out = []
        for d in body.get("dynamic", []):
            for label, spec in d.items():
                if unquote_label(label) != name:
                    continue
                items = self.eval(spec["for_each"], scope)
                if not is_known(items):
                    raise EvalError(f"dynamic {name}: for_each is not known")
                it = items.items() if isinstance(items, dict) else enumerate(items)
                for k, v in it:
                    scope = {name: {"key": k, "value": v}}
                    out.append((spec["content"][0], scope))
        return out
