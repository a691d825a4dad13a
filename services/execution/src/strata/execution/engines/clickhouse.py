"""The ClickHouse engines: embedded chdb (:class:`ChdbEngine`) or a server (:class:`ClickHouseServerEngine`).

ClickHouse has no switch like DuckDB's ``enable_external_access``: ``file()``, ``url()``, ``s3()``, ``remote()``...
and the ``file()`` *scalar* function read whatever the process can reach, and ``readonly=1``, which would stop the
table functions, also stops the ``file()``/``s3()`` calls our tables are read through (views over them too). So the
sandbox is built from the statement itself, and checked twice:

1. **Analysis** (sqlglot, ClickHouse dialect; :meth:`ClickHouseEngine.analyze`): one read-only statement (SELECT,
   WITH, set operations, ``EXPLAIN [PLAN|PIPELINE|SYNTAX|AST|QUERY TREE|ESTIMATE]`` of one, ``DESCRIBE``); no
   ``SETTINGS``, ``FORMAT``, ``INTO OUTFILE``, ``SET``, ``SHOW``...; every table that is not a CTE is one of the
   run's datasets (so ``system.*`` and ``information_schema.*`` are "not found"); table functions only from
   :data:`TABLE_FUNCTIONS` (they make rows, read nothing); scalar functions not in :data:`DENIED_FUNCTIONS` (files,
   settings, server facts, dictionaries, introspection, AI calls...). Parameters are ``{name:Type}`` and ClickHouse
   binds them itself (never ``Identifier``, which would name a table).
2. **Rewrite**: each table reference is replaced by ``file('<path>', 'Parquet')`` or ``s3('<url>', <key>, <secret>,
   'Parquet')`` (``AS <name>`` added so that ``name.column`` still works). Only those spans are replaced, with
   fragments sqlglot generates from expression nodes. Regenerating the whole statement from sqlglot's tree would
   change what some queries mean: ``toStartOfHour(ts)`` comes back as ``dateTrunc('HOUR', ts)``, which on a
   DateTime64 column (what Parquet timestamps are) returns DateTime64 instead of DateTime (Date32 instead of Date
   for months). The user's SQL runs as written, and error positions point into it.
3. **Verification** by ClickHouse's own parser (``EXPLAIN AST`` of the final statement, parameters bound): the only
   ``file``/``s3`` calls are ours, argument for argument; no other table, table function, denied function,
   ``SETTINGS`` or output clause. Whatever sqlglot and ClickHouse disagree on fails here.
4. **Limits the statement cannot lift**, per session: ``readonly=2`` (no writes, no DDL; 2 rather than 1 because 1
   also refuses ``file()``/``s3()``), ``max_execution_time``, ``max_result_rows`` = max_rows+1 with
   ``result_overflow_mode='break'``, ``max_memory_usage``, ``max_bytes_to_read``, ``max_threads``.

Results stream as Arrow into the Parquet file (at most ``max_rows`` rows); column types come from ``DESCRIBE``.
chdb cancel is ``KILL QUERY`` (matched on a per-run ``log_comment``) from a control connection: chdb connections
share one ClickHouse instance and kill works across them within ~0.1 s. The server engine kills by ``query_id``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

import pyarrow as pa  # type: ignore[import-untyped]
import sqlglot
from sqlglot import exp
from sqlglot.dialects.clickhouse import ClickHouse
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokenizer_core import Token, TokenType

from strata.common.storage import FileStorage, S3Storage, Storage

from .base import (
    Analysis,
    BindError,
    ColumnNotFound,
    Engine,
    EngineError,
    Execution,
    ForbiddenStatement,
    Interrupted,
    MultipleStatements,
    ParameterError,
    QueryError,
    ResourceLimit,
    RunResult,
    RunSpec,
    SandboxViolation,
    SqlSyntaxError,
    TableNotFound,
    TableRef,
)
from .common import (
    CancellableExecution,
    Deadline,
    ParquetSink,
    Scrubber,
    char_index,
    line_col,
    replace_in_strings,
)
from .settings import EngineSettings

if TYPE_CHECKING:
    from chdb.state.sqlitelike import Connection as ChdbConnection
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

_DIALECT = ClickHouse()


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Table functions a statement may call (lower case, without underscores): they make rows and read nothing.
TABLE_FUNCTIONS = frozenset({"numbers", "numbersmt", "zeros", "zerosmt", "generateseries", "values", "generaterandom"})

#: Every table function chdb 4.4 knows but the allowed ones: refused as scalar functions too (but ``format``, which
#: is also a string function).
_OTHER_TABLE_FUNCTIONS = _words(
    """arrowstream azureblobstorage azureblobstoragecluster bigquery cluster clusterallreplicas cosn deltalake
    deltalakeazure deltalakeazurecluster deltalakecluster deltalakelocal deltalakes3 deltalakes3cluster dictionary
    eval executable file filecluster filesystem fuzzjson fuzzquery gcs hdfs hdfscluster hudi hudicluster
    iceberg icebergazure icebergazurecluster icebergcluster iceberghdfs iceberghdfscluster iceberglocal
    iceberglocalcluster icebergs3 icebergs3cluster input jdbc loop merge mergetreeanalyzeindexes
    mergetreeanalyzeindexesuuid mergetreecodecblockcounts mergetreeindex mergetreeprojection mergetreetextindex
    mongodb mysql null odbc oss paimon paimonazure paimonazurecluster paimoncluster paimonhdfs paimonhdfscluster
    paimonlocal paimons3 paimons3cluster postgresql primes prometheusquery prometheusqueryrange python redis remote
    remotesecure s3 s3cluster sqlite sqlstandardvalues timeseriesdata timeseriesmetricfamilies timeseriesmetrics
    timeseriessamples timeseriesselector timeseriestags url urlcluster view viewexplain viewifpermitted ytsaurus"""
)

#: Scalar functions refused (lower case): they read files or settings, tell about the server, reach dictionaries,
#: tables or the network, or run code. From chdb 4.4's ``system.functions`` categories Other, Introspection, AI,
#: Machine Learning, Dictionary and Embedded Dictionary (the rest of those categories is harmless formatting).
DENIED_FUNCTIONS = (
    _words(
        """file getsetting getsettingordefault getserversetting getmergetreesetting getmacro getserverport tcpport
        hostname fqdn displayname serveruuid uptime buildid getoskernelversion filesystemavailable
        filesystemcapacity filesystemunreserved getclienthttpheader currentrequesturl showcertificate joinget
        joingetornull hascolumnintable getmaxtablenamelengthfordatabase globalvariable zookeepersessionuptime
        generateserialid sleep sleepeachrow addresstoline addresstolinewithinlines addresstosymbol demangle
        logtrace tid ismergetreepartcoveredby mergetreepartinfo catboostevaluate evalmlmethod naivebayesclassifier
        naivebayesclassifierwithallprobs naivebayesclassifierwithprob aiclassify aiembed aiextract aifilter
        aigenerate airedact aisimilarity aitranslate transactionid transactionlatestsnapshot
        transactionoldestsnapshot"""
    )
    | _OTHER_TABLE_FUNCTIONS
)
_DENIED_PREFIXES = ("dictget", "dicthas", "dictis", "region", "__")

#: ``EXPLAIN`` kinds and the options they take (``EXPLAIN PLAN header=1 ...``): none of them changes a setting.
_EXPLAIN_KINDS = ("AST", "SYNTAX", "QUERY TREE", "PLAN", "PIPELINE", "ESTIMATE")
_EXPLAIN_OPTIONS = _words(
    """header description actions indexes json optimize sorting keep_logical_steps distributed projections compact
    graph run_passes dump_passes passes dump_tree dump_ast oneline query_tree_passes input_headers column_structure"""
)
_SYSTEM_DATABASES = frozenset({"system", "information_schema"})
_FIRST_WORDS = {TokenType.SELECT, TokenType.WITH, TokenType.L_PAREN, TokenType.FROM, TokenType.VALUES}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EXPLAIN_RESULT = [{"name": "explain", "type": "String", "nullable": False}]
_DESCRIBE_RESULT = [
    {"name": n, "type": "String", "nullable": False}
    for n in ("name", "type", "default_type", "default_expression", "comment", "codec_expression", "ttl_expression")
]


# ----------------------------------------------------------------------------------------------------- analysis


@dataclass
class _TableUse:
    ref: str
    start: int  # char indices in the user's SQL, end exclusive
    end: int
    alias: str | None  # the name to add as alias (None: it has one, or DESCRIBE)


@dataclass
class _Statement:
    kind: str
    sql: str  # the user's SQL
    start: int  # the statement's first and last character (without comments, ";")
    end: int
    tables: list[TableRef] = field(default_factory=list)
    uses: list[_TableUse] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    parameter_types: dict[str, str] = field(default_factory=dict)  # as declared, at first use
    ctes: set[str] = field(default_factory=set)
    names: dict[str, int] = field(default_factory=dict)  # columns and functions -> char index of first use
    select_start: int = 0  # where the query proper starts (after EXPLAIN ...)

    def analysis(self) -> Analysis:
        return Analysis(kind=self.kind, tables=tuple(self.tables), parameters=tuple(self.parameters))


def _normalize(name: str) -> str:
    return name.lower().replace("_", "")


def _denied(name: str) -> bool:
    lowered = name.lower()
    return lowered in DENIED_FUNCTIONS or _normalize(name) in DENIED_FUNCTIONS or lowered.startswith(_DENIED_PREFIXES)


def _tokenize(sql: str, offset: int = 0) -> list[Token]:
    try:
        tokens = _DIALECT.tokenize(sql[offset:])
    except TokenError as exc:
        raise SqlSyntaxError(f"Syntax error: {str(exc).split(chr(10), 1)[0]}") from None
    for token in tokens:
        token.start += offset
        token.end += offset
    return tokens


def analyze_clickhouse(sql: str) -> _Statement:
    """The checks of step 1 (see the module docstring), shared by the chdb and server engines."""
    tokens = _tokenize(sql)
    if tokens and tokens[0].token_type == TokenType.COMMAND and tokens[0].text.upper() == "EXPLAIN":
        # sqlglot keeps the rest of a command as one string (with made-up positions): tokenize it as SQL
        tokens = [tokens[0], *_tokenize(sql, tokens[0].end + 1)]
    statements: list[list[Token]] = [[]]
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append([])
        else:
            statements[-1].append(token)
    statements = [s for s in statements if s]
    if not statements:
        raise SqlSyntaxError("The query is empty.")
    if len(statements) > 1:
        raise MultipleStatements(f"Only one statement may run; this query has {len(statements)}.")
    body = statements[0]
    first = body[0]
    stmt = _Statement(kind="select", sql=sql, start=first.start, end=body[-1].end + 1)
    word = first.text.upper()
    if first.token_type == TokenType.COMMAND and word == "EXPLAIN":
        stmt.kind = "explain"
        stmt.select_start = _explain_body(body[1:])
    elif first.token_type in (TokenType.DESCRIBE, TokenType.DESC):
        stmt.kind = "describe"
        stmt.select_start = stmt.start
    elif first.token_type in _FIRST_WORDS:
        stmt.select_start = stmt.start
    elif first.token_type in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.STRING, TokenType.NUMBER):
        raise SqlSyntaxError(
            f"Syntax error near {first.text!r}: expected SELECT, WITH, EXPLAIN or DESCRIBE.", position=_at(sql, first)
        )
    else:
        raise ForbiddenStatement(
            f"{word} statements are not allowed: a query is one read-only statement (SELECT, WITH, EXPLAIN, DESCRIBE)."
        )
    _check_tokens(sql, [t for t in body if t.start >= stmt.select_start])
    tree = _parse(sql, stmt.select_start, stmt.end)
    if stmt.kind == "describe":
        if not isinstance(tree, exp.Describe):
            raise ForbiddenStatement("DESCRIBE takes a table or a (subquery).")
    elif not isinstance(tree, exp.Query | exp.Values):
        raise ForbiddenStatement("Only one read-only statement (SELECT, WITH, EXPLAIN, DESCRIBE) may run.")
    _Walker(stmt).walk(tree)
    return stmt


def _explain_body(tokens: list[Token]) -> int:
    """Where the statement an EXPLAIN explains starts, after its kind and options (``tokens``: after EXPLAIN)."""
    i = 0
    words = [t.text.upper() for t in tokens]
    for kind in _EXPLAIN_KINDS:
        n = len(kind.split())
        if words[i : i + n] == kind.split():
            i += n
            break
    else:
        if words[:2] == ["TABLE", "OVERRIDE"]:
            raise ForbiddenStatement("EXPLAIN TABLE OVERRIDE is not available.")
    # options: name = value [, ...]
    while i + 2 < len(tokens) and tokens[i + 1].token_type == TokenType.EQ:
        name = tokens[i].text.lower()
        if name not in _EXPLAIN_OPTIONS:
            raise ForbiddenStatement(f"EXPLAIN option {name} is not available.")
        i += 3
        if i < len(tokens) and tokens[i].token_type == TokenType.COMMA:
            i += 1
    if i >= len(tokens):
        raise SqlSyntaxError("EXPLAIN needs a statement to explain.")
    if tokens[i].token_type not in _FIRST_WORDS:
        raise ForbiddenStatement("EXPLAIN may only explain a SELECT.")
    return tokens[i].start


def _check_tokens(sql: str, tokens: list[Token]) -> None:
    """``INTO OUTFILE`` is not ClickHouse syntax sqlglot knows: refuse it with a clear message."""
    for prev, token in itertools.pairwise(tokens):
        if prev.token_type == TokenType.INTO and token.text.upper() == "OUTFILE":
            raise ForbiddenStatement(
                "INTO OUTFILE is not allowed: results are written for you.", position=_at(sql, prev)
            )


def _at(sql: str, token: Token) -> tuple[int, int]:
    return line_col(sql, token.start)


def _parse(sql: str, start: int, end: int) -> exp.Expr:
    text = sql[start:end]
    try:
        trees = sqlglot.parse(text, read=_DIALECT)
    except ParseError as exc:
        error = exc.errors[0] if exc.errors else {}
        position = _parse_error_position(sql, start, error)
        description = str(error.get("description") or "cannot parse the statement")
        highlight = error.get("highlight")
        near = f" near {highlight!r}" if highlight else ""
        raise SqlSyntaxError(f"Syntax error{near}: {description}", position=position) from None
    found: list[exp.Expr] = [t for t in trees if t is not None]
    if len(found) != 1:
        raise MultipleStatements("Only one statement may run.")
    tree = found[0]
    if isinstance(tree, exp.Command):
        raise ForbiddenStatement(f"{tree.name.upper()} statements are not allowed.")
    for node in tree.walk():
        _rebase(node, start)
    return tree


def _rebase(node: exp.Expr, offset: int) -> None:
    meta = node.meta if isinstance(node, exp.Identifier | exp.Literal | exp.Func | exp.Column) else None
    if meta and "start" in meta and not meta.get("rebased"):
        meta["start"] += offset
        meta["end"] += offset
        meta["rebased"] = True


def _parse_error_position(sql: str, start: int, error: dict[str, Any]) -> tuple[int, int] | None:
    line, col = error.get("line"), error.get("col")
    if not isinstance(line, int) or not isinstance(col, int):
        return None
    # sqlglot reports the line and the column of the offending token's last character, in the parsed text
    text = sql[start:]
    lines = text.split("\n")
    if line > len(lines):
        return None
    index = start + sum(len(x) + 1 for x in lines[: line - 1]) + max(0, col - 1)
    highlight = error.get("highlight")
    if isinstance(highlight, str) and highlight:
        found = sql.rfind(highlight, 0, index + 1)
        if found >= 0:
            index = found
    return line_col(sql, index)


class _Walker:
    def __init__(self, stmt: _Statement) -> None:
        self.stmt = stmt
        self.sql = stmt.sql

    def position(self, node: exp.Expr) -> tuple[int, int] | None:
        for candidate in (node, *node.find_all(exp.Identifier)):
            start = candidate.meta.get("start")
            if isinstance(start, int):
                return line_col(self.sql, start)
        return None

    def walk(self, tree: exp.Expr) -> None:
        # CTE names: ClickHouse resolves a table name to a CTE of that name in any enclosing scope; a name that is a
        # CTE anywhere is taken as a CTE everywhere (a wrong guess fails as "unknown table", never reads a file)
        for cte in tree.find_all(exp.CTE):
            if cte.alias:
                self.stmt.ctes.add(cte.alias)
        table_functions: set[int] = set()
        for node in tree.walk():
            if isinstance(node, exp.Identifier) and _CONTROL.search(node.name):
                raise ForbiddenStatement("Names may not contain control characters.", position=self.position(node))
            if isinstance(node, exp.Table):
                if isinstance(node.this, exp.Func):
                    table_functions.add(id(node.this))
                self.table(node)
            elif isinstance(node, exp.Func) and id(node) not in table_functions:
                self.function(node)
            elif isinstance(node, exp.Placeholder):
                self.parameter(node)
            elif isinstance(node, exp.Column):
                self.column(node)
            if isinstance(node, exp.Query):
                for arg, why in (
                    ("settings", "limits are set by the service"),
                    ("format", "results are written as Parquet"),
                    ("into", "results are written for you"),
                ):
                    if node.args.get(arg):
                        raise ForbiddenStatement(
                            f"{arg.upper()} clauses are not allowed: {why}.", position=self.position(node)
                        )

    def table(self, node: exp.Table) -> None:
        this = node.this
        if isinstance(this, exp.Func):
            name = this.name if isinstance(this, exp.Anonymous) else this.sql_name()
            if _normalize(name) not in TABLE_FUNCTIONS:
                raise SandboxViolation(
                    f"Table function {name}() is not available: queries read their datasets by name (allowed: "
                    "numbers, numbers_mt, zeros, zeros_mt, generate_series, values, generateRandom).",
                    position=self.position(node),
                )
            return
        if not isinstance(this, exp.Identifier):
            raise SandboxViolation("A table must be named as written, not computed.", position=self.position(node))
        identifiers = [
            p for p in (node.args.get("catalog"), node.args.get("db"), this) if isinstance(p, exp.Identifier)
        ]
        parts = tuple(p.name for p in identifiers)
        if len(parts) == 1 and parts[0] in self.stmt.ctes:
            return
        ref = ".".join(parts)
        if ref not in {t.ref for t in self.stmt.tables}:
            self.stmt.tables.append(TableRef(ref=ref, parts=parts))
        start, end = identifiers[0].meta.get("start"), identifiers[-1].meta.get("end")
        if not isinstance(start, int) or not isinstance(end, int):
            raise SqlSyntaxError(f"Cannot place table {ref} in the statement.")
        described = isinstance(node.parent, exp.Describe)
        alias = None if described or node.args.get("alias") else parts[-1]
        self.stmt.uses.append(_TableUse(ref=ref, start=start, end=end + 1, alias=alias))

    def function(self, node: exp.Func) -> None:
        name = str(node.name) if isinstance(node, exp.Anonymous | exp.AnonymousAggFunc) else node.sql_name()
        if _denied(name):
            raise SandboxViolation(f"Function {name}() is not available.", position=self.position(node))
        self.stmt.names.setdefault(name.lower(), self._start(node))

    def column(self, node: exp.Column) -> None:
        qualifiers = [p.name.lower() for p in node.parts[:-1]]
        if qualifiers and qualifiers[0] in _SYSTEM_DATABASES:
            raise TableNotFound(
                f"Table {'.'.join(p.name for p in node.parts[:-1])} does not exist.", position=self.position(node)
            )
        self.stmt.names.setdefault(node.name.lower(), self._start(node))

    def _start(self, node: exp.Expr) -> int:
        for candidate in (node, *node.find_all(exp.Identifier)):
            start = candidate.meta.get("start")
            if isinstance(start, int):
                return start
        return -1

    def parameter(self, node: exp.Placeholder) -> None:
        kind = node.args.get("kind")
        name = node.name
        if not name or kind is None:
            raise ParameterError(
                "Parameters are written {name:Type} (e.g. {since:Date}) and passed by name.",
                position=self.position(node),
            )
        type_name = kind.sql(dialect=_DIALECT) if isinstance(kind, exp.Expr) else str(kind)
        if type_name.strip().lower() == "identifier":
            raise ParameterError(
                f"Parameter {name} has type Identifier: names of tables and columns cannot be parameters.",
                parameter=name,
            )
        if name not in self.stmt.parameters:
            self.stmt.parameters.append(name)
            self.stmt.parameter_types[name] = type_name


# ------------------------------------------------------------------------------------------------------ rewrite


@dataclass(frozen=True)
class _Source:
    """How ClickHouse reads one dataset: a table function call, as text and as the arguments it must have."""

    function: str  # file | s3
    args: tuple[str, ...]
    secrets: tuple[str, ...] = ()  # what must never be shown (credentials)

    def sql(self) -> str:
        node = exp.Anonymous(this=self.function, expressions=[exp.Literal.string(a) for a in self.args])
        return node.sql(dialect=_DIALECT)


@dataclass
class _Rewritten:
    sql: str  # the statement ClickHouse runs
    # (start in sql, start in the user's SQL, length) of every piece copied unchanged
    pieces: list[tuple[int, int, int]]
    sources: list[_Source]
    select_at: int  # where the query proper starts in ``sql`` (after EXPLAIN ...)

    def original_index(self, index: int) -> int:
        """A char index in :attr:`sql` as an index in the user's SQL (a replaced span maps to its start)."""
        best = 0
        for start, orig, length in self.pieces:
            if start <= index < start + length:
                return orig + index - start
            if start <= index:
                best = orig + length
        return best


def rewrite(stmt: _Statement, sources: dict[str, _Source]) -> _Rewritten:
    """The user's statement with each table reference replaced by its source (step 2 of the module docstring)."""
    sql = stmt.sql
    out: list[str] = []
    pieces: list[tuple[int, int, int]] = []
    length = 0
    pos = stmt.start
    select_at = 0
    for use in sorted(stmt.uses, key=lambda u: u.start):
        if pos < use.start:
            out.append(sql[pos : use.start])
            pieces.append((length, pos, use.start - pos))
            length += use.start - pos
        fragment = sources[use.ref].sql()
        if use.alias is not None:
            fragment += " AS " + exp.to_identifier(use.alias, quoted=True).sql(dialect=_DIALECT)
        out.append(fragment)
        length += len(fragment)
        pos = use.end
    out.append(sql[pos : stmt.end])
    pieces.append((length, pos, stmt.end - pos))
    final = "".join(out)
    for start, orig, size in pieces:
        if orig <= stmt.select_start < orig + size:
            select_at = start + stmt.select_start - orig
            break
    return _Rewritten(sql=final, pieces=pieces, sources=list(sources.values()), select_at=select_at)


# -------------------------------------------------------------------------------------------------- verification

_LINE = re.compile(r"^(?P<indent> *)(?P<type>\w+)(?: (?P<rest>.*?))?$")
_CHILDREN = re.compile(r"\(children (\d+)\)$")
_LITERAL = re.compile(r"^Literal '(?P<body>(?:[^'\\]|\\.)*)'$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "\\": "\\", "'": "'"}


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def verify_ast(ast: str, stmt: _Statement, sources: list[_Source]) -> None:
    """Step 3: the final statement as ClickHouse parsed it (``EXPLAIN AST``) reads only what it should."""
    lines = [line for line in ast.split("\n") if line.strip()]
    parsed = []
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            raise SandboxViolation("The statement could not be verified.")
        parsed.append((len(match.group("indent")), match.group("type"), match.group("rest") or ""))
    if not parsed or parsed[0][0] != 0 or parsed[0][1] not in ("SelectWithUnionQuery", "DescribeQuery", "Explain"):
        raise ForbiddenStatement("Only one read-only statement (SELECT, WITH, EXPLAIN, DESCRIBE) may run.")
    expected = {(s.function, s.args) for s in sources}
    for i, (indent, kind, rest) in enumerate(parsed):
        children = _CHILDREN.search(rest)
        count = int(children.group(1)) if children else 0
        if indent == 0 and i > 0:
            raise MultipleStatements("Only one statement may run.")
        if kind in ("SelectWithUnionQuery", "DescribeQuery") and count > 1:
            raise ForbiddenStatement("INTO OUTFILE and FORMAT clauses are not allowed.")
        if kind == "Set" and not (indent == 1 and parsed[0][1] == "Explain"):
            raise ForbiddenStatement("SETTINGS clauses are not allowed: limits are set by the service.")
        if kind == "TableIdentifier":
            name = rest.split(" (", 1)[0]
            if "." in name or name not in stmt.ctes:
                raise TableNotFound(f"Table {name} does not exist (or is not shared with you).", table=name)
        elif kind == "Identifier":
            qualifier, dot, _ = rest.split(" (", 1)[0].partition(".")
            if dot and qualifier.lower() in _SYSTEM_DATABASES:
                raise TableNotFound("Tables of the system database are not available.")
        elif kind == "Function":
            name = rest.split(" ", 1)[0]
            parent = next((p for p in reversed(parsed[:i]) if p[0] == indent - 1), None)
            if name.lower() in ("file", "s3") and parent is not None and parent[1] == "TableExpression":
                if (name.lower(), _call_args(parsed, i)) not in expected:
                    raise SandboxViolation(f"Table function {name}() is not available.")
            elif _denied(name):
                raise SandboxViolation(f"Function {name}() is not available.")
            elif parent is not None and parent[1] == "TableExpression" and _normalize(name) not in TABLE_FUNCTIONS:
                raise SandboxViolation(f"Table function {name}() is not available.")


def _call_args(parsed: list[tuple[int, str, str]], i: int) -> tuple[str, ...] | None:
    """The string arguments of the call at line ``i`` if it has exactly ``ExpressionList`` > ``Literal '...'``."""
    indent = parsed[i][0]
    subtree = []
    for line in parsed[i + 1 :]:
        if line[0] <= indent:
            break
        subtree.append(line)
    if not subtree or subtree[0][:2] != (indent + 1, "ExpressionList"):
        return None
    args = []
    for depth, kind, rest in subtree[1:]:
        match = _LITERAL.match(f"{kind} {rest}")
        if depth != indent + 2 or match is None:
            return None
        args.append(_unescape(match.group("body")))
    return tuple(args)


# ------------------------------------------------------------------------------------------------------- errors

_CH_ERROR = re.compile(r"Code: (?P<code>\d+)\. DB::\w*Exception: (?P<message>.*)", re.DOTALL)
_CH_NAME = re.compile(r"\((?P<name>[A-Z][A-Z0-9_]+)\)\s*$")
_CH_NOISE = [
    re.compile(r"\s*\(version [\d.]+[^)]*\)"),
    re.compile(r"\s*In scope .*?(?=\.\s*\([A-Z_]+\)\s*$|$)", re.DOTALL),
    re.compile(r":?\s*\(in file/uri [^)]*\)"),
    re.compile(r":?\s*While executing [\w ]+"),
    re.compile(r"\s*\([A-Z][A-Z0-9_]+\)\s*$"),
]
_POSITION = re.compile(r"failed at position (\d+)")
_QUOTED = re.compile(r"[`'](?P<name>[^`']+)[`']")


def map_clickhouse_error(
    message: str, stmt: _Statement, rewritten: _Rewritten | None, scrub: Scrubber, *, prefix: int = 0
) -> QueryError | Interrupted:
    """A ClickHouse error message as a :class:`QueryError`. ``prefix`` is how many characters we put before the final
    statement in what failed (``EXPLAIN AST ``, ``DESCRIBE (``)."""
    message = message.removeprefix("Streaming query failed: ")
    match = _CH_ERROR.search(message)
    body = match.group("message") if match else message
    while nested := _CH_ERROR.match(body):
        body = nested.group("message")
    named = _CH_NAME.search(message)
    name = named.group("name") if named else ""
    code = int(match.group("code")) if match else 0
    text = scrub(body)
    for pattern in _CH_NOISE:
        text = pattern.sub("", text)
    text = text.strip().rstrip(".") + "."
    position = _error_position(message, stmt, rewritten, prefix)
    quoted = _QUOTED.search(text)
    identifier = quoted.group("name") if quoted else None
    if position is None and identifier and identifier.lower() in stmt.names:
        index = stmt.names[identifier.lower()]
        position = line_col(stmt.sql, index) if index >= 0 else None
    if name == "SYNTAX_ERROR" or code == 62:
        return SqlSyntaxError(text.split(" Expected one of:", 1)[0].rstrip(".:") + ".", position=position)
    if name in ("QUERY_WAS_CANCELLED", "ABORTED") or code == 394:
        return Interrupted("the query was cancelled")
    if name == "TIMEOUT_EXCEEDED" or code == 159:
        return Interrupted("the query ran longer than its time limit")
    if name == "UNKNOWN_IDENTIFIER" or code == 47:
        return ColumnNotFound(text, position=position, column_name=identifier)
    if name == "UNKNOWN_TABLE" or code in (60, 81):
        return TableNotFound(text, position=position)
    parameter = re.search(r"query parameter '([^']+)'|Substitution `([^`]+)`", body)
    if parameter or name in ("BAD_QUERY_PARAMETER", "UNKNOWN_QUERY_PARAMETER") or code in (456, 457):
        pname = (parameter.group(1) or parameter.group(2)) if parameter else None
        return ParameterError(text, parameter=pname) if pname else ParameterError(text)
    if name in ("MEMORY_LIMIT_EXCEEDED", "TOO_MANY_BYTES", "TOO_MANY_ROWS", "TOO_MANY_ROWS_OR_BYTES") or code in (
        241,
        307,
        158,
        396,
    ):
        return ResourceLimit(text)
    if name in ("READONLY", "ACCESS_DENIED") or code in (164, 497):
        return ForbiddenStatement(text, position=position)
    if name in (
        "UNKNOWN_FUNCTION",
        "ILLEGAL_TYPE_OF_ARGUMENT",
        "NUMBER_OF_ARGUMENTS_DOESNT_MATCH",
        "NO_COMMON_TYPE",
        "NOT_AN_AGGREGATE",
        "ILLEGAL_AGGREGATION",
        "AMBIGUOUS_IDENTIFIER",
        "AMBIGUOUS_COLUMN_NAME",
        "UNKNOWN_TYPE",
        "TYPE_MISMATCH",
        "BAD_ARGUMENTS",
        "UNKNOWN_AGGREGATE_FUNCTION",
        "ALIAS_REQUIRED",
    ):
        return BindError(text, position=position)
    return EngineError(text, position=position)


def _error_position(
    message: str, stmt: _Statement, rewritten: _Rewritten | None, prefix: int
) -> tuple[int, int] | None:
    found = _POSITION.search(message)
    if found is None or rewritten is None:
        return None
    # 1-based byte offset in what we sent
    sent = " " * prefix + rewritten.sql
    index = char_index(sent, int(found.group(1)) - 1) - prefix
    return line_col(stmt.sql, rewritten.original_index(max(0, index)))


# ------------------------------------------------------------------------------------------------------ engines


def _quote_literal(value: str) -> str:
    return exp.Literal.string(value).sql(dialect=_DIALECT)


class ClickHouseEngine(Engine):
    """What the chdb and server engines share: analysis, sources, limits."""

    name: ClassVar[str] = "clickhouse"

    def __init__(self, *, storage: Storage, settings: EngineSettings) -> None:
        self.storage = storage
        self.settings = settings

    def analyze(self, sql: str) -> Analysis:
        return analyze_clickhouse(sql).analysis()

    def start(self, spec: RunSpec) -> Execution:
        stmt = analyze_clickhouse(spec.sql)
        return self._execution(spec, stmt)

    @abstractmethod
    def _execution(self, spec: RunSpec, stmt: _Statement) -> Execution: ...

    def source(self, path: str) -> _Source:
        """How ClickHouse reads the Parquet file ``path`` (a local path or ``s3://bucket/key``)."""
        if not path.startswith("s3://"):
            return _Source("file", (path, "Parquet"))
        if not isinstance(self.storage, S3Storage):
            raise EngineError("This dataset is stored where the ClickHouse engine cannot read it.")
        parts = urlsplit(path)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        endpoint = self.storage.endpoint_url
        if endpoint:
            url = f"{endpoint.rstrip('/')}/{bucket}/{quote(key, safe='/')}"
        elif self.storage.region:
            url = f"https://{bucket}.s3.{self.storage.region}.amazonaws.com/{quote(key, safe='/')}"
        else:
            url = f"https://{bucket}.s3.amazonaws.com/{quote(key, safe='/')}"
        fs: Any = self.storage.fsspec_filesystem()
        key_id, secret = getattr(fs, "key", None), getattr(fs, "secret", None)
        if key_id and secret:
            return _Source("s3", (url, str(key_id), str(secret), "Parquet"), secrets=(str(key_id), str(secret)))
        # no explicit credentials: ClickHouse takes them from its environment (instance role, AWS_* variables)
        return _Source("s3", (url, "Parquet"))

    def limits(self, spec: RunSpec) -> dict[str, int | str]:
        """Settings of step 4 for one run (what the statement may not change)."""
        limits: dict[str, int | str] = {
            "readonly": 2,
            "max_threads": self.settings.threads,
            "max_memory_usage": self.settings.memory_limit_bytes,
            "max_result_rows": spec.max_rows + 1,
            "result_overflow_mode": "break",
            "max_execution_time": max(1, int(spec.timeout_s + 0.999)) if spec.timeout_s > 0 else 0,
            "timeout_overflow_mode": "throw",
        }
        if self.settings.max_bytes_to_read:
            limits["max_bytes_to_read"] = self.settings.max_bytes_to_read
        return limits


def _check_run(spec: RunSpec, stmt: _Statement) -> None:
    missing = [t for t in stmt.tables if t.ref not in spec.tables]
    if missing:
        use = next((u for u in stmt.uses if u.ref == missing[0].ref), None)
        raise TableNotFound(
            f"Table {missing[0].ref} does not exist (or is not shared with you).",
            position=line_col(spec.sql, use.start) if use else None,
            table=missing[0].ref,
        )
    for name, value in spec.parameters.items():
        if name in stmt.parameter_types:
            check_parameter(name, stmt.parameter_types[name], value)
    absent = [p for p in stmt.parameters if p not in spec.parameters]
    if absent:
        raise ParameterError(f"Missing value for parameter {absent[0]}.", parameter=absent[0], missing=absent)
    extra = [p for p in spec.parameters if p not in stmt.parameters]
    if extra:
        raise ParameterError(f"Parameter {extra[0]} is not used by the query.", parameter=extra[0], unused=extra)


_WRAPPERS = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$", re.IGNORECASE)
_INTEGER = re.compile(r"^(U?)Int(8|16|32|64|128|256)$", re.IGNORECASE)


def check_parameter(name: str, declared: str, value: Any) -> None:
    """What ClickHouse would accept wrongly: it wraps integers around (``{x:UInt8}`` with 300 gives 44)."""
    inner = declared.strip()
    while match := _WRAPPERS.match(inner):
        inner = match.group(1).strip()
    integer = _INTEGER.match(inner)
    if integer is None or value is None:
        return
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"Parameter {name} must be an integer ({declared}), not {value!r}.", parameter=name)
    bits = int(integer.group(2))
    low, high = (0, 2**bits - 1) if integer.group(1) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if not low <= value <= high:
        raise ParameterError(f"Parameter {name} = {value} is out of range for {declared}.", parameter=name)


def parameter_text(value: Any) -> str:
    """A parameter value in the text form ClickHouse parses parameters from (the escaped TSV form)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    if isinstance(value, list):
        return "[" + ",".join(_nested(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_nested(str(k))}:{_nested(v)}" for k, v in value.items()) + "}"
    raise ParameterError(
        f"Parameter values must be strings, numbers, booleans, null, lists or objects, not {type(value).__name__}."
    )


def _nested(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "NULL"
    return parameter_text(value)


class _ClickHouseExecution(CancellableExecution):
    """One run: the steps common to chdb and a server; subclasses say how to send a statement."""

    #: chdb takes parameter values as ClickHouse text; clickhouse-connect formats Python values itself
    _params_as_text: ClassVar[bool] = True
    _INTERRUPT_IS_INSTANT = False  # KILL QUERY is a statement

    def __init__(self, engine: ClickHouseEngine, spec: RunSpec, stmt: _Statement) -> None:
        super().__init__()
        self._engine = engine
        self._spec = spec
        self._stmt = stmt
        self._marker = f"strata:{spec.query_id}:{uuid.uuid4().hex[:12]}"
        self._rewritten: _Rewritten | None = None
        self._scrub = Scrubber({})
        self._replacements: dict[str, str] = {}
        self._stats: dict[str, Any] = {}

    # what subclasses provide

    @abstractmethod
    def _open(self, limits: dict[str, int | str]) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _text(self, sql: str, params: dict[str, Any]) -> str:
        """Run ``sql`` and return its result as raw tab-separated text."""

    @abstractmethod
    def _arrow(self, sql: str, params: dict[str, Any], *, small: bool) -> Iterator[pa.RecordBatch | pa.Schema]:
        """Run ``sql``, yielding its Arrow schema (when known) and record batches. Closing the iterator ends it.
        ``small``: a result of a few rows (EXPLAIN, DESCRIBE, none), which chdb cannot stream."""

    # the run

    def run(self) -> RunResult:
        started = time.perf_counter()
        deadline = Deadline(self._spec.timeout_s, self._on_deadline)
        try:
            return self._run(started)
        finally:
            deadline.cancel()
            self._finished.set()
            with self._lock:
                self._close()

    def _prepare(self) -> tuple[_Rewritten, dict[str, Any]]:
        spec, stmt = self._spec, self._stmt
        _check_run(spec, stmt)
        sources = {t.ref: self._engine.source(spec.tables[t.ref].path) for t in stmt.tables}
        replacements: dict[str, str] = {}
        for ref, source in sources.items():
            for arg in source.args[:1]:
                replacements[arg] = ref
            replacements[spec.tables[ref].path] = ref
            for secret in source.secrets:
                replacements[secret] = "[HIDDEN]"
            if source.function == "s3":
                key = urlsplit(spec.tables[ref].path).path.lstrip("/")
                replacements[key] = ref
        replacements[str(self._engine.settings.workdir)] = "<workdir>"
        if isinstance(self._engine.storage, FileStorage):
            replacements[str(self._engine.storage.root)] = "<storage>"
        self._replacements = replacements
        self._scrub = Scrubber(replacements)
        texts = {name: parameter_text(value) for name, value in spec.parameters.items()}  # validates them too
        return rewrite(stmt, sources), texts if self._params_as_text else dict(spec.parameters)

    def _fail(self, exc: BaseException, *, prefix: int = 0) -> QueryError | Interrupted:
        error = map_clickhouse_error(str(exc), self._stmt, self._rewritten, self._scrub, prefix=prefix)
        if isinstance(error, Interrupted):
            return self._interrupted()
        return error

    def _run(self, started: float) -> RunResult:
        spec, stmt = self._spec, self._stmt
        self._check_cancelled()
        rewritten, params = self._prepare()
        self._rewritten = rewritten
        final = rewritten.sql
        limits = self._engine.limits(spec)
        with self._lock:
            self._open(limits)
        setup_ms = (time.perf_counter() - started) * 1000
        self._check_cancelled()
        self._step(lambda: verify_ast(self._text("EXPLAIN AST " + final, params), stmt, rewritten.sources), 12)
        query = final[rewritten.select_at :]
        if stmt.kind == "select":
            described = self._step(lambda: self._text(f"DESCRIBE ({query})", params), 10)
            columns = [_column(line) for line in described.split("\n") if line]
        elif stmt.kind == "describe":
            columns = list(_DESCRIBE_RESULT)
        else:
            columns = list(_EXPLAIN_RESULT)
        self._check_cancelled()
        if spec.dry_run:
            plan = None
            if stmt.kind == "select":
                plan = self._scrub(self._step(lambda: self._text("EXPLAIN PLAN " + query, params), 13))
            return RunResult(rows=0, columns=columns, plan=plan, stats=self._stats_with(started, setup_ms))
        transform = None
        if stmt.kind == "explain":
            # EXPLAIN SYNTAX, AST and QUERY TREE print the rewritten statement: our paths and credentials
            replacements = self._replacements

            def transform(batch: pa.RecordBatch) -> pa.RecordBatch:
                return replace_in_strings(batch, replacements)

        sink = ParquetSink(spec.output, max_rows=spec.max_rows, transform=transform)
        try:
            small = stmt.kind != "select"
            schema = self._step(lambda: self._stream(final, params, sink, small=small), 0)
            if schema is None:
                # an empty result comes without a schema: ask for it without running the query
                sql = f"SELECT * FROM ({query}) LIMIT 0"  # noqa: S608 - ``query`` is the verified statement
                schema = self._step(lambda: self._schema(sql, params), 15)
            sink.finish(schema)
        except BaseException:
            sink.abort()
            raise
        return RunResult(
            rows=sink.rows, columns=columns, truncated=sink.truncated, stats=self._stats_with(started, setup_ms)
        )

    def _step(self, fn: Any, prefix: int) -> Any:
        """Run one engine call, mapping its errors (``prefix``: characters we put before the statement)."""
        try:
            return fn()
        except (QueryError, Interrupted):
            raise
        except Exception as exc:
            if not _CH_ERROR.search(str(exc)):
                raise
            raise self._fail(exc, prefix=prefix) from None

    def _stream(self, sql: str, params: dict[str, Any], sink: ParquetSink, *, small: bool) -> pa.Schema | None:
        schema: pa.Schema | None = None
        stream = self._arrow(sql, params, small=small)
        try:
            for item in stream:
                if isinstance(item, pa.Schema):
                    schema = item
                    continue
                schema = item.schema
                if not sink.add(item):
                    break
                self._check_cancelled()
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return schema

    def _schema(self, sql: str, params: dict[str, Any]) -> pa.Schema:
        schema: pa.Schema | None = None
        for item in self._arrow(sql, params, small=True):
            schema = item if isinstance(item, pa.Schema) else item.schema
        if schema is None:
            raise EngineError("The engine returned no result schema.")
        return schema

    def _stats_with(self, started: float, setup_ms: float) -> dict[str, Any]:
        return {
            **self._stats,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
            "setup_ms": round(setup_ms, 2),
        }


def _column(line: str) -> dict[str, Any]:
    name, type_name = line.split("\t")[:2]
    return {"name": _unescape(name), "type": type_name, "nullable": type_name.startswith("Nullable(")}


# -------------------------------------------------------------------------------------------------------- chdb


class ChdbEngine(ClickHouseEngine):
    """ClickHouse embedded (chdb): every run opens its own session on the process's one ClickHouse instance.

    A control session opened with the engine keeps the instance alive (the first connection costs ~20 ms, the next
    ones ~0.2 ms) and kills queries on cancel.
    """

    def __init__(self, *, storage: Storage, settings: EngineSettings) -> None:
        super().__init__(storage=storage, settings=settings)
        import chdb

        self._chdb = chdb
        self._control_lock = threading.Lock()
        self._control: ChdbConnection | None = chdb.connect(":memory:")

    def _execution(self, spec: RunSpec, stmt: _Statement) -> ChdbExecution:
        return ChdbExecution(self, spec, stmt)

    def connect(self) -> ChdbConnection:
        return self._chdb.connect(":memory:")

    def kill(self, marker: str) -> None:
        with self._control_lock:
            if self._control is None:
                return
            self._control.query(f"KILL QUERY WHERE Settings['log_comment'] = {_quote_literal(marker)} ASYNC", "CSV")

    def close(self) -> None:
        with self._control_lock:
            control, self._control = self._control, None
        if control is not None:
            control.close()


class ChdbExecution(_ClickHouseExecution):
    _engine: ChdbEngine

    def __init__(self, engine: ChdbEngine, spec: RunSpec, stmt: _Statement) -> None:
        super().__init__(engine, spec, stmt)
        self._conn: ChdbConnection | None = None
        self._read = (0, 0)

    def _open(self, limits: dict[str, int | str]) -> None:
        conn = self._engine.connect()
        settings = {**limits, "log_comment": self._marker, "log_queries": 0}
        # readonly last: once it is 2 the session may still change other settings, never readonly itself
        items = sorted(settings.items(), key=lambda kv: kv[0] == "readonly")
        assignments = ", ".join(f"{k} = {v if isinstance(v, int) else _quote_literal(str(v))}" for k, v in items)
        conn.query(f"SET {assignments}", "CSV")
        conn.set_progress_callback(self._on_progress)
        self._conn = conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _interrupt(self) -> None:
        with self._lock:
            active = self._conn is not None
        if active:
            self._engine.kill(self._marker)

    def _on_progress(self, info: dict[str, Any]) -> None:
        self._read = (int(info.get("read_rows") or 0), int(info.get("total_rows_to_read") or 0))
        self._stats["rows_read"] = self._read[0]
        self._stats["bytes_read"] = int(info.get("read_bytes") or 0)

    def progress(self) -> float | None:
        read, total = self._read
        if total <= 0 or self._finished.is_set():
            return None
        return min(1.0, read / total)

    def _connection(self) -> ChdbConnection:
        conn = self._conn
        if conn is None:
            raise self._interrupted()
        return conn

    def _text(self, sql: str, params: dict[str, Any]) -> str:
        result = self._connection().query(sql, "TSVRaw", params=params)
        return str(result.bytes().decode())

    def _arrow(self, sql: str, params: dict[str, Any], *, small: bool) -> Iterator[pa.RecordBatch | pa.Schema]:
        if small:
            data = self._connection().query(sql, "Arrow", params=params).bytes()
            if data:
                reader = pa.ipc.open_file(pa.py_buffer(data))
                yield reader.schema
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            return
        stream = self._connection().send_query(sql, "Arrow", params=params)
        try:
            while (chunk := stream.fetch()) is not None:  # type: ignore[no-untyped-call]
                data = chunk.bytes()
                if not data:
                    continue
                reader = pa.ipc.open_file(pa.py_buffer(data))
                yield reader.schema
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------------------------------------ server


class ClickHouseServerEngine(ClickHouseEngine):
    """A ClickHouse server or cluster through clickhouse-connect (``EngineSettings.clickhouse_url``).

    Datasets are read by the server with ``s3()``, so they must be in S3 storage the server can reach at the same
    endpoint. The server's user must allow ``readonly=2`` and the limits of :meth:`ClickHouseEngine.limits`.
    """

    def __init__(self, *, storage: Storage, settings: EngineSettings) -> None:
        super().__init__(storage=storage, settings=settings)
        if not settings.clickhouse_url:
            raise ValueError("ClickHouseServerEngine needs settings.clickhouse_url")
        self._client: Client | None = None
        self._client_lock = threading.Lock()

    def client(self) -> Client:
        with self._client_lock:
            if self._client is None:
                import clickhouse_connect

                # no session: one client serves concurrent runs and the KILL of another
                self._client = clickhouse_connect.get_client(
                    dsn=self.settings.clickhouse_url, autogenerate_session_id=False
                )
            return self._client

    def source(self, path: str) -> _Source:
        if not path.startswith("s3://"):
            raise EngineError(
                "The ClickHouse server cannot read datasets stored in a local folder: configure S3 storage "
                "(STRATA_STORAGE_URL=s3://...) that the server can reach, or use the duckdb engine."
            )
        return super().source(path)

    def _execution(self, spec: RunSpec, stmt: _Statement) -> ServerExecution:
        return ServerExecution(self, spec, stmt)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class ServerExecution(_ClickHouseExecution):
    _engine: ClickHouseServerEngine
    _params_as_text: ClassVar[bool] = False

    def __init__(self, engine: ClickHouseServerEngine, spec: RunSpec, stmt: _Statement) -> None:
        super().__init__(engine, spec, stmt)
        self._settings: dict[str, Any] | None = None
        self._query_id = f"{spec.query_id}-{uuid.uuid4().hex[:12]}"

    def _open(self, limits: dict[str, int | str]) -> None:
        self._settings = {**limits, "log_comment": self._marker}

    def _close(self) -> None:
        self._settings = None

    def _interrupt(self) -> None:
        with self._lock:
            active = self._settings is not None
        if active:
            with contextlib.suppress(Exception):
                self._engine.client().command(
                    "KILL QUERY WHERE query_id = {id:String} ASYNC", parameters={"id": self._query_id}
                )

    def _query_settings(self) -> dict[str, Any]:
        if self._settings is None:
            raise self._interrupted()
        return {**self._settings, "query_id": self._query_id}

    def _text(self, sql: str, params: dict[str, Any]) -> str:
        raw = self._engine.client().raw_query(sql, parameters=params, settings=self._query_settings(), fmt="TSVRaw")
        return bytes(raw).decode()

    def _arrow(self, sql: str, params: dict[str, Any], *, small: bool) -> Iterator[pa.RecordBatch | pa.Schema]:
        with self._engine.client().query_arrow_stream(
            sql, parameters=params, settings=self._query_settings(), use_strings=True
        ) as stream:
            for table in stream:
                yield table.schema
                yield from table.to_batches()
