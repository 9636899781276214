"""Final-answer extraction and comparison for MATH500, AIME24 and GSM8K (docs/analysis.md).

MATH/AIME: the last complete `\\boxed{...}` (nested braces) of the model's text, normalised, against
the reference answer normalised the same way; numbers compare as exact fractions. GSM8K: the last
number of the text against the number after `####` of the reference solution.
"""
import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")


def last_boxed(text):
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed X`), else None."""
    found = None
    for match in _BOXED.finditer(text):
        start = match.end()
        if text.startswith("{", start):
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        found = text[start + 1:i]
                        break
            # an unclosed brace (a text cut off by the step limit) is no answer
        else:
            plain = re.match(r"[^\s$]+", text[start:])
            if plain:
                found = plain.group(0)
    return found


def _unwrap_command(text, command):
    """`\\command{x}` -> `x` for every occurrence, with nested braces in x."""
    out, i = [], 0
    pattern = re.compile(r"\\" + command + r"\s*\{")
    while True:
        match = pattern.search(text, i)
        if not match:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:match.start()])
        depth, j = 1, match.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unbalanced: leave the rest as it is
            out.append(text[match.start():])
            return "".join(out)
        out.append(text[match.end():j - 1])
        i = j


def normalize_math(answer):
    """Canonical text of a MATH-style answer (see docs/analysis.md for each rule)."""
    s = answer.strip()
    s = re.sub(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    for command in ("text", "textbf", "textrm", "mathrm", "mathbf", "mbox"):
        s = _unwrap_command(s, command)
    s = re.sub(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|~", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\%|%|\\\$|\$", "", s)
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}, \sqrt3 -> \sqrt{3} (single-character arguments)
    s = re.sub(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    return s.rstrip(".")


def parse_number(text):
    """Exact value of an integer, decimal, `a/b` or `\\frac{a}{b}` (with thousands separators), or None."""
    s = text.strip()
    sign = 1
    if s and s[0] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"\d+(\.\d*)?|\.\d+", s):
        return sign * Fraction(s)
    fraction = re.fullmatch(r"(\d+)/(\d+)|\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if fraction:
        numerator, denominator = (fraction.group(1), fraction.group(2)) if fraction.group(1) \
            else (fraction.group(3), fraction.group(4))
        if int(denominator) == 0:
            return None
        return sign * Fraction(int(numerator), int(denominator))
    return None


def math_equal(predicted, reference):
    """True when two MATH-style answers agree after normalisation (numbers as exact fractions)."""
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(reference)
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


def math_reference_answer(answer):
    """The reference answer itself, or its last `\\boxed{}` when it is a whole solution."""
    return last_boxed(answer) or answer


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text):
    """The last number in `text` as written (thousands separators allowed), else None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_reference_answer(answer):
    """The number after the last `####` of a GSM8K solution."""
    if "####" not in answer:
        raise ValueError(f"no '####' in the reference answer {answer[-80:]!r}")
    value = parse_number(answer.rsplit("####", 1)[1].strip().replace(",", ""))
    if value is None:
        raise ValueError(f"the text after '####' is not a number: {answer.rsplit('####', 1)[1].strip()!r}")
    return value
