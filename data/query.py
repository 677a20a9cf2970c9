"""A small private query language over the bundled fact tables: one no model has seen, for the
"domain expert" experiment (fine-tune a base or an instruct model to write it).

SPEC is the whole language, as a user would be given it:
"""
import random
import re

from data import world

SPEC = """\
A query starts with a table, then stages separated by "|", and ends with pick or count.
  tables:  countries (name, capital, continent, subregion, currency, language, population)
           elements (name, symbol, atomic_number, period, group, block, category, phase)
           us_states (name, abbreviation, capital, statehood_year)
  filter:  FIELD OP VALUE, several joined by ","  (OP: = != < > <= >=; VALUE: "text" or a number;
           < > <= >= only on number fields; a row with no value for FIELD never passes)
  order:   top N by FIELD (largest first) | bottom N by FIELD (smallest first); one, after
           the filters
  end:     pick FIELD, FIELD ...  (the values, in table order unless ordered) | count
Examples:
  Q: What is the capital of France?
  Query: countries | name = "France" | pick capital
  Q: Which noble gases are in period 2?
  Query: elements | period = 2, category = "noble gas" | pick name
  Q: What are the 3 most populous countries in Europe?
  Query: countries | continent = "Europe" | top 3 by population | pick name
  Q: How many states joined the union before 1800?
  Query: us_states | statehood_year < 1800 | count"""
__doc__ += "\n" + SPEC + "\n"

FIELDS = {"countries": ["name", "capital", "continent", "subregion", "currency", "language",
                        "population"],
          "elements": ["name", "symbol", "atomic_number", "period", "group", "block", "category",
                       "phase"],
          "us_states": ["name", "abbreviation", "capital", "statehood_year"]}
NUMBERS = {"population", "atomic_number", "period", "group", "statehood_year"}
OPS = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
       ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
_TOKEN = re.compile(r'\s*(?:(?P<string>"[^"]*")|(?P<number>-?\d+)|(?P<op>!=|<=|>=|[=<>|,])'
                    r'|(?P<word>[A-Za-z_]+))')


class QueryError(ValueError):
    """A query the language does not allow: the message says where and what was expected."""


def tokens(text):
    """[(kind, value, column)] with kind string/number/op/word; QueryError on anything else."""
    out, pos = [], 0
    while text[pos:].strip():
        m = _TOKEN.match(text, pos)
        if not m:
            rest = text[pos:].lstrip()
            raise QueryError(f"column {len(text) - len(rest) + 1}: unexpected {rest[:12]!r}")
        kind = m.lastgroup
        value = m.group(kind)
        out.append((kind, value[1:-1] if kind == "string" else int(value) if kind == "number"
                    else value, m.start(kind) + 1))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text):
        self.toks, self.i = tokens(text), 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", None, None)

    def accept(self, kind, value):
        """Step over the next token if it is this kind and value (a keyword, a comma)."""
        if self.peek()[:2] == (kind, value):
            self.i += 1
            return True
        return False

    def take(self, kind, value=None, expected=None):
        tok = self.peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            where = f"column {tok[2]}" if tok[2] else "the end"
            got = f"{tok[1]!r}" if tok[2] else "nothing"
            raise QueryError(f"{where}: expected {expected or repr(value)}, got {got}")
        self.i += 1
        return tok[1]

    def field(self, table):
        col, fields = self.peek()[2], f"a field of {table} ({', '.join(FIELDS[table])})"
        name = self.take("word", expected=fields)
        if name not in FIELDS[table]:
            raise QueryError(f"column {col}: expected {fields}, got {name!r}")
        return name


def parse(text):
    """The query as {"table", "filters": [(field, op, value)], "order": (field, descending, n) or
    None, "pick": [fields] or None (None: count)}; QueryError says what is wrong and where."""
    p = _Parser(text)
    table = p.take("word", expected=f"a table ({', '.join(FIELDS)})")
    if table not in FIELDS:
        raise QueryError(f"column 1: no table {table!r} (tables: {', '.join(FIELDS)})")
    query = {"table": table, "filters": [], "order": None, "pick": None}
    while True:
        p.take("op", "|", expected='"|" and a stage')
        col = p.peek()[2]
        if p.accept("word", "count"):
            break
        if p.accept("word", "pick"):
            query["pick"] = [p.field(table)]
            while p.accept("op", ","):
                query["pick"].append(p.field(table))
            break
        if query["order"]:  # stages run in the order written: filters, then one order
            raise QueryError(f"column {col}: after top/bottom only pick or count may follow")
        top = p.accept("word", "top")
        if top or p.accept("word", "bottom"):
            n = p.take("number", expected="how many (a number)")
            if n < 1:
                raise QueryError(f"column {col}: top/bottom needs at least 1 row, got {n}")
            p.take("word", "by")
            query["order"] = (_number_field(p, table), top, n)
        else:
            query["filters"] += _conditions(p, table)
    p.take("end", expected="the end of the query after pick or count")
    return query


def _number_field(p, table):
    col = p.peek()[2]
    name = p.field(table)
    if name not in NUMBERS:
        raise QueryError(f"column {col}: {name} is text; order and compare by a number field")
    return name


def _conditions(p, table):
    conds = []
    while True:
        col = p.peek()[2]
        name = p.field(table)
        op = p.take("op", expected="an operator (= != < > <= >=)")
        if op not in OPS:
            raise QueryError(f"column {col}: expected an operator after {name}, got {op!r}")
        kind, value, _ = p.peek()
        if kind not in ("string", "number"):
            p.take("string", expected='a value ("text" or a number)')
        p.i += 1
        if (name in NUMBERS) != (kind == "number") or (op not in ("=", "!=") and kind != "number"):
            what = "a number" if name in NUMBERS else '"text" with = or !='
            raise QueryError(f"column {col}: {name} takes {what}")
        conds.append((name, op, value))
        if not p.accept("op", ","):
            return conds


def execute(query, facts=None):
    """Run a parsed query (or its text) on the fact tables: a list of values (one picked
    field), of tuples (several), or a count."""
    if isinstance(query, str):
        query = parse(query)
    rows = _where((facts or world.load_facts())[query["table"]], query["filters"])
    if query["order"]:
        field, descending, n = query["order"]
        rows = sorted((r for r in rows if r[field] is not None), key=lambda r: r[field],
                      reverse=descending)[:n]
    if query["pick"] is None:
        return len(rows)
    picked = [tuple(r[f] for f in query["pick"]) for r in rows]
    return [p[0] for p in picked] if len(query["pick"]) == 1 else picked


# ----------------------------------------------------------------------------- questions
# (table, field, wordings) for a question about one entity; {X} is its name.
LOOKUPS = [
    ("countries", "capital", ["What is the capital of {X}?", "Which city is the capital of {X}?",
                              "Name the capital of {X}."]),
    ("countries", "continent", ["On which continent is {X}?", "Which continent is {X} in?"]),
    ("countries", "currency", ["What currency does {X} use?", "Which currency is used in {X}?"]),
    ("countries", "language", ["What language is spoken in {X}?", "What do people speak in {X}?"]),
    ("countries", "population", ["How many people live in {X}?", "What is the population of {X}?"]),
    ("elements", "symbol", ["What is the symbol of {X}?", "Which symbol does {X} have?"]),
    ("elements", "atomic_number", ["What is the atomic number of {X}?"]),
    ("elements", "category", ["What kind of element is {X}?", "Which category is {X} in?"]),
    ("elements", "period", ["In which period is {X}?"]),
    ("us_states", "capital", ["What is the capital of the state of {X}?"]),
    ("us_states", "abbreviation", ["What is the postal code of {X}?"]),
    ("us_states", "statehood_year", ["When did {X} become a state?", "In what year did {X} join "
                                                                     "the union?"]),
]
# (table, field looked up, wordings): from a value back to the entity; {V} is the value.
REVERSE = [("elements", "symbol", ["Which element has the symbol {V}?"]),
           ("us_states", "abbreviation", ["Which state has the postal code {V}?"]),
           ("countries", "capital", ["{V} is the capital of which country?"])]


def _q(table, filters=(), order=None, pick=None):
    """A query's text from its parts (the one place the generator writes queries)."""
    stages = [", ".join(f'{f} {op} {literal(v)}' for f, op, v in filters)] if filters else []
    if order:
        stages.append(f"{'top' if order[1] else 'bottom'} {order[2]} by {order[0]}")
    stages.append(f"pick {', '.join(pick)}" if pick else "count")
    return " | ".join([table] + stages)


def literal(v):
    return str(v) if isinstance(v, int) else f'"{v}"'


def _where(rows, filters):
    """The rows that pass every filter (a missing value passes none)."""
    return [r for r in rows if all(r[f] is not None and OPS[op](r[f], v) for f, op, v in filters)]


def entity_items(facts, heldout):
    """(question, query, answer) for one fact about one entity, and for a value back to its
    entity; entities of the held-out ~25% (world.is_heldout) if `heldout`, else the rest."""
    items = []
    for table, field, wordings in LOOKUPS:
        for row in facts[table]:
            if world.is_heldout(row["name"]) == heldout and row[field] is not None:
                for w in wordings:
                    items.append((w.format(X=row["name"]),
                                  _q(table, [("name", "=", row["name"])], pick=[field]),
                                  [row[field]]))
    for table, field, wordings in REVERSE:
        for row in facts[table]:
            if world.is_heldout(row["name"]) == heldout:
                answer = [r["name"] for r in facts[table] if r[field] == row[field]]
                items += [(w.format(V=row[field]), _q(table, [(field, "=", row[field])],
                                                      pick=["name"]), answer) for w in wordings]
    return items


def aggregate_items(facts, shapes):
    """(question, query, answer) that count, list or rank rows, for the named shapes; each answer
    computed here from the tables, apart from the interpreter."""
    countries, elements = facts["countries"], facts["elements"]
    continents = sorted({r["continent"] for r in countries})
    categories = sorted({r["category"] for r in elements})
    # shape: [(question, table, filters, order (field, largest first, n) or None, pick or None)]
    templates = {
        "count": [(f"How many countries are in {c}?", "countries", [("continent", "=", c)],
                   None, None) for c in continents]
        + [(f"How many elements are classed as {c}?", "elements", [("category", "=", c)],
            None, None) for c in categories]
        + [(f"How many states joined the union before {y}?", "us_states",
            [("statehood_year", "<", y)], None, None) for y in range(1790, 1960, 10)]
        + [(f"How many elements have an atomic number above {n}?", "elements",
            [("atomic_number", ">", n)], None, None) for n in range(10, 115, 15)],
        "list": [(f"Which elements are in period {p}?", "elements", [("period", "=", p)], None,
                  ["name"]) for p in range(1, 8)]
        + [(f"Which states joined the union after {y}?", "us_states",
            [("statehood_year", ">", y)], None, ["name"]) for y in range(1850, 1960, 10)]
        + [(f"Which countries are in {r}?", "countries", [("subregion", "=", r)], None, ["name"])
           for r in sorted({r["subregion"] for r in countries})],
        "top": [(f"What are the {n} most populous countries in {c}?", "countries",
                 [("continent", "=", c)], ("population", True, n), ["name"])
                for c in continents for n in (2, 3, 5)],
        # the two constructs of the held-out shapes, taught on the other tables
        "ranked_elsewhere": [(f"Which {n} states joined the union first?", "us_states", [],
                              ("statehood_year", False, n), ["name"]) for n in (2, 3, 5)]
        + [(f"Which {n} elements of period {p} have the lowest atomic numbers?", "elements",
            [("period", "=", p)], ("atomic_number", False, n), ["name"])
           for p in range(2, 8) for n in (2, 3)],
        "range": [(f"How many states joined the union between {a} and {a + d}?", "us_states",
                   [("statehood_year", ">", a), ("statehood_year", "<", a + d)], None, None)
                  for a in range(1780, 1960, 20) for d in (20, 40)],
        # held out: bottom on countries, two conditions on elements and on countries
        "bottom": [(f"What are the {n} least populous countries in {c}?", "countries",
                    [("continent", "=", c)], ("population", False, n), ["name"])
                   for c in continents for n in (2, 3)],
        "two_filters": [(f"Which {c} elements are in period {p}?", "elements",
                         [("category", "=", c), ("period", "=", p)], None, ["name"])
                        for c in categories for p in range(1, 8)
                        if _where(elements, [("category", "=", c), ("period", "=", p)])]
        + [(f"How many countries in {c} have more than {n} million people?", "countries",
            [("continent", "=", c), ("population", ">", n * 10 ** 6)], None, None)
           for c in continents for n in (10, 50)],
    }
    items = []
    for shape in shapes:
        for question, table, filters, order, pick in templates[shape]:
            rows = _where(facts[table], filters)
            if order:
                rows = sorted(rows, key=lambda r: r[order[0]], reverse=order[1])[:order[2]]
            items.append((question, _q(table, filters, order, pick),
                          [r["name"] for r in rows] if pick else len(rows)))
    return items


TRAIN_SHAPES = ("count", "list", "top", "ranked_elsewhere", "range")
HELDOUT_SHAPES = ("bottom", "two_filters")  # their constructs are trained, on other tables


def query_pairs(split="train", seed=0):
    """(question, query, answer) triples, shuffled. train: questions about the training entities
    and the shapes of TRAIN_SHAPES; heldout_entities: the same kinds of question about the
    held-out entities; heldout_shapes: question shapes the training pairs never show."""
    facts = world.load_facts()
    items = {"train": lambda: entity_items(facts, False) + aggregate_items(facts, TRAIN_SHAPES),
             "heldout_entities": lambda: entity_items(facts, True),
             "heldout_shapes": lambda: aggregate_items(facts, HELDOUT_SHAPES)}[split]()
    random.Random(f"{split}:{seed}").shuffle(items)
    return items
