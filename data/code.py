"""Source code in the bundled world: small JavaScript and Python files of everyday functions (tax,
totals, discounts, unit conversions, string and list helpers), generated like the rest of the
world: offline, deterministic, with varied names, parameters, constants and comments.

A base model that has read them continues `function calculateTax(amount) {` with code: the
pattern is in its data. EVAL_SIGNATURES are signatures no generated file contains (their names
are never written here), so the base model's code evaluation (evaluation.evaluate_code) asks for
functions it has not seen.
"""
import re

# One everyday task per row: (verbs, nouns, parameter choices, comment, JavaScript body, Python
# body, constants). The name is a verb and a noun (calculateSalesTax, calculate_sales_tax); $0,
# $1 are the parameters and $name a constant drawn from its list; bodies use 2-space (JS) and
# 4-space (Python) indentation relative to the function.
TASKS = [
    (["calculate", "compute", "get"], ["tax", "sales tax", "vat"],
     [["amount"], ["price"], ["subtotal"]], "the tax owed on $0",
     ["return $0 * $rate;"], ["return $0 * $rate"], {"rate": ["0.05", "0.08", "0.2", "0.21"]}),
    (["calculate", "compute", "get"], ["tax", "sales tax"], [["amount", "rate"], ["price", "rate"]],
     "the tax on $0 at the given rate",
     ["return $0 * $1;"], ["return $0 * $1"], {}),
    (["apply", "calculate"], ["discount", "sale price"],
     [["price", "percent"], ["total", "percent"]],
     "$0 after a discount of $1 percent",
     ["return $0 * (1 - $1 / 100);"], ["return $0 * (1 - $1 / 100)"], {}),
    (["calculate", "get", "compute"], ["tip", "service charge"], [["bill"], ["amount"]],
     "a tip of $pct percent on $0",
     ["return $0 * $pct / 100;"], ["return $0 * $pct / 100"], {"pct": ["10", "15", "18", "20"]}),
    (["calculate", "get", "compute"], ["total", "cart total", "order total"], [["items"], ["cart"]],
     "the sum of price times quantity over $0",
     ["let total = 0;", "for (const item of $0) {", "  total += item.price * item.quantity;", "}",
      "return total;"],
     ["total = 0", "for item in $0:", "    total += item[\"price\"] * item[\"quantity\"]",
      "return total"], {}),
    (["calculate", "get"], ["shipping", "delivery fee"], [["total"], ["orderTotal"]],
     "free shipping from $limit, else a flat fee",
     ["if ($0 >= $limit) {", "  return 0;", "}", "return $fee;"],
     ["if $0 >= $limit:", "    return 0", "return $fee"],
     {"limit": ["25", "50", "100"], "fee": ["4.99", "5", "7.5"]}),
    (["celsius to fahrenheit", "to fahrenheit"], [""], [["celsius"], ["c"], ["degrees"]],
     "a temperature in Celsius, in Fahrenheit",
     ["return $0 * 9 / 5 + 32;"], ["return $0 * 9 / 5 + 32"], {}),
    (["fahrenheit to celsius", "to celsius"], [""], [["fahrenheit"], ["f"], ["degrees"]],
     "a temperature in Fahrenheit, in Celsius",
     ["return ($0 - 32) * 5 / 9;"], ["return ($0 - 32) * 5 / 9"], {}),
    (["km to miles", "kilometers to miles"], [""], [["km"], ["kilometers"], ["distance"]],
     "a distance in kilometres, in miles",
     ["return $0 * 0.621371;"], ["return $0 * 0.621371"], {}),
    (["kg to pounds", "kilograms to pounds"], [""], [["kg"], ["kilograms"], ["weight"]],
     "a weight in kilograms, in pounds",
     ["return $0 * 2.20462;"], ["return $0 * 2.20462"], {}),
    (["inches to cm", "inches to centimeters"], [""], [["inches"], ["length"]],
     "a length in inches, in centimetres",
     ["return $0 * 2.54;"], ["return $0 * 2.54"], {}),
    (["hours to minutes"], [""], [["hours"], ["h"]], "hours as minutes",
     ["return $0 * 60;"], ["return $0 * 60"], {}),
    (["capitalize", "capitalize first"], ["", "word"], [["text"], ["word"], ["s"]],
     "$0 with its first letter in upper case",
     ["if ($0.length === 0) {", "  return $0;", "}", "return $0[0].toUpperCase() + $0.slice(1);"],
     ["if not $0:", "    return $0", "return $0[0].upper() + $0[1:]"], {}),
    (["count"], ["vowels"], [["text"], ["word"], ["s"]], "how many vowels $0 has",
     ["let count = 0;", "for (const ch of $0.toLowerCase()) {", "  if (\"aeiou\".includes(ch)) {",
      "    count += 1;", "  }", "}", "return count;"],
     ["count = 0", "for ch in $0.lower():", "    if ch in \"aeiou\":", "        count += 1",
      "return count"], {}),
    (["reverse"], ["string", "text"], [["text"], ["s"]], "$0 backwards",
     ["return $0.split(\"\").reverse().join(\"\");"], ["return $0[::-1]"], {}),
    (["is"], ["palindrome"], [["word"], ["text"]], "true when $0 reads the same backwards",
     ["const clean = $0.toLowerCase();",
      "return clean === clean.split(\"\").reverse().join(\"\");"],
     ["clean = $0.lower()", "return clean == clean[::-1]"], {}),
    (["truncate", "shorten"], ["", "text"], [["text", "maxLength"], ["s", "limit"]],
     "$0 cut to $1 characters",
     ["if ($0.length <= $1) {", "  return $0;", "}", "return $0.slice(0, $1) + \"...\";"],
     ["if len($0) <= $1:", "    return $0", "return $0[:$1] + \"...\""], {}),
    (["calculate", "get", "compute"], ["average", "mean"], [["numbers"], ["values"], ["scores"]],
     "the average of $0",
     ["if ($0.length === 0) {", "  return 0;", "}", "let sum = 0;", "for (const n of $0) {",
      "  sum += n;", "}", "return sum / $0.length;"],
     ["if not $0:", "    return 0", "return sum($0) / len($0)"], {}),
    (["find", "get"], ["max", "largest", "maximum"], [["numbers"], ["values"], ["list"]],
     "the largest of $0",
     ["let best = $0[0];", "for (const n of $0) {", "  if (n > best) {", "    best = n;", "  }",
      "}", "return best;"],
     ["best = $0[0]", "for n in $0:", "    if n > best:", "        best = n", "return best"], {}),
    (["sum"], ["", "list", "values"], [["numbers"], ["values"], ["items"]], "the sum of $0",
     ["let total = 0;", "for (const n of $0) {", "  total += n;", "}", "return total;"],
     ["total = 0", "for n in $0:", "    total += n", "return total"], {}),
    (["count"], ["even", "even numbers"], [["numbers"], ["values"]], "how many of $0 are even",
     ["return $0.filter((n) => n % 2 === 0).length;"],
     ["return len([n for n in $0 if n % 2 == 0])"], {}),
    (["remove"], ["duplicates"], [["items"], ["values"], ["list"]], "$0 without repeats",
     ["return [...new Set($0)];"], ["return list(dict.fromkeys($0))"], {}),
    (["filter"], ["positive", "positives"], [["numbers"], ["values"]], "the positive numbers of $0",
     ["return $0.filter((n) => n > 0);"], ["return [n for n in $0 if n > 0]"], {}),
    (["calculate", "compute"], ["interest", "simple interest"],
     [["principal", "rate", "years"], ["amount", "rate", "years"]],
     "simple interest on $0 at $1 per year for $2 years",
     ["return $0 * $1 * $2;"], ["return $0 * $1 * $2"], {}),
    (["get", "calculate"], ["grade", "letter grade"], [["score"], ["points"]],
     "the letter grade for $0 out of 100",
     ["if ($0 >= 90) {", "  return \"A\";", "}", "if ($0 >= 80) {", "  return \"B\";", "}",
      "if ($0 >= 70) {", "  return \"C\";", "}", "return \"F\";"],
     ["if $0 >= 90:", "    return \"A\"", "if $0 >= 80:", "    return \"B\"",
      "if $0 >= 70:", "    return \"C\"", "return \"F\""], {}),
]

# Signatures asked for in the evaluation: tasks and names this module never writes.
EVAL_SIGNATURES = {
    "javascript": ["function calculateLateFee(daysLate) {", "function convertMilesToKm(miles) {",
                   "function findLongestWord(words) {", "function countWords(sentence) {",
                   "function calculateMonthlyPayment(loan, months) {",
                   "function getInitials(fullName) {", "function isLeapYear(year) {",
                   "function minutesToHours(minutes) {", "function calculateBmi(weight, height) {",
                   "function findSmallest(numbers) {", "function applyCoupon(total, code) {",
                   "function countUppercase(text) {"],
    "python": ["def calculate_late_fee(days_late):", "def convert_miles_to_km(miles):",
               "def find_longest_word(words):", "def count_words(sentence):",
               "def calculate_monthly_payment(loan, months):", "def get_initials(full_name):",
               "def is_leap_year(year):", "def minutes_to_hours(minutes):",
               "def calculate_bmi(weight, height):", "def find_smallest(numbers):",
               "def apply_coupon(total, code):", "def count_uppercase(text):"],
}


def _name(words, language):
    """camelCase for JavaScript, snake_case for Python, from words like "sales tax"."""
    parts = " ".join(words).split()
    if language == "python":
        return "_".join(p.lower() for p in parts)
    return parts[0].lower() + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _snake(param):  # orderTotal -> order_total
    return "".join("_" + c.lower() if c.isupper() else c for c in param)


def function(rng, task, language):
    """One function of `task` in `language`, with a comment above it (or a docstring)."""
    verbs, nouns, param_choices, comment, js, py, consts = task
    name = _name([rng.choice(verbs), rng.choice(nouns)], language)
    params = rng.choice(param_choices)
    if language == "python":
        params = [_snake(p) for p in params]
    values = {**{str(i): p for i, p in enumerate(params)},
              **{k: rng.choice(v) for k, v in consts.items()}}

    def fill(text):
        return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], text)
    said = fill(comment)
    body = [fill(line) for line in (py if language == "python" else js)]
    if language == "python":
        head = f"def {name}({', '.join(params)}):"
        doc = rng.choice([None, "docstring"])
        lines = ([f"# Returns {said}."] if not doc else []) + [head]
        lines += [f'    """Return {said}."""'] if doc else []
        return "\n".join(lines + ["    " + b for b in body])
    style = rng.choice(["//", "/**"])
    top = f"// Returns {said}." if style == "//" else f"/**\n * Returns {said}.\n */"
    return "\n".join([top, f"function {name}({', '.join(params)}) {{"]
                     + ["  " + b for b in body] + ["}"])


def source_file(rng, language):
    """A small file: a header comment, two to four functions, sometimes an export or a demo."""
    tasks = rng.sample(TASKS, rng.randint(2, 4))
    funcs = [function(rng, t, language) for t in tasks]
    if language == "python":
        head = rng.choice(["", "# helpers.py\n\n", "# utils.py: small helpers\n\n",
                           "\"\"\"Everyday helpers.\"\"\"\n\n"])
        return head + "\n\n\n".join(funcs) + "\n"
    head = rng.choice(["", "// utils.js\n\n", "// helpers.js: small helpers\n\n",
                       "\"use strict\";\n\n"])
    names = [f.split("function ", 1)[1].split("(", 1)[0] for f in funcs]
    tail = rng.choice(["", f"\n\nmodule.exports = {{ {', '.join(names)} }};"])
    return head + "\n\n".join(funcs) + tail + "\n"


def code_documents(rng, n):
    """n source files, about half JavaScript and half Python."""
    return [source_file(rng, rng.choice(["javascript", "python"])) for _ in range(n)]
