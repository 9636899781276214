"""Answer extraction and normalisation (analysis/answers.py) on a table of cases: nested braces,
no \\boxed, several \\boxed, equivalent forms that must match and near-misses that must not."""
import json
import os
import sys
import unittest
from fractions import Fraction

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import answers  # noqa: E402

# (model text, the answer extracted from it)
EXTRACTION = [
    ("so the answer is \\boxed{5}.", "5"),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("thus \\boxed{\\left(3, \\frac{\\pi}{2}\\right)} is it", "\\left(3, \\frac{\\pi}{2}\\right)"),
    ("\\boxed{x^{2^{3}}+\\sqrt{\\frac{1}{4}}}", "x^{2^{3}}+\\sqrt{\\frac{1}{4}}"),
    ("The answer is 5.", None),
    ("", None),
    ("first \\boxed{3}, but on reflection \\boxed{4}", "4"),
    ("\\boxed{3} and then the text is cut off \\boxed{\\frac{4}{", "3"),
    ("\\boxed 7 and more", "7"),
    ("\\fbox{9}", "9"),
    ("\\boxed{}", ""),
    ("\\boxedx{2} is not a box", None),
]

# (predicted, reference, must match)
MATH_CASES = [
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\frac34", "\\frac{3}{4}", True),
    ("0.75", "\\frac{3}{4}", True),
    ("3/4", "\\frac{3}{4}", True),
    ("5.0", "5", True),
    ("5.00", "5", True),
    (" 12 ", "12", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("1,000", "1000", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac12", True),
    ("x = 5", "5", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("\\text{(B)}", "(B)", True),
    ("\\tfrac{1}{3}", "\\frac13", True),
    ("2\\sqrt3", "2\\sqrt{3}", True),
    ("10\\%", "10", True),
    ("\\$18", "18", True),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}", True),
    (".5", "1/2", True),
    ("\\{1,2\\}", "\\{1, 2\\}", True),
    ("\\frac{14}{3}.", "\\frac{14}{3}", True),
    ("\\frac{3}{5}", "\\frac{3}{4}", False),
    ("0.33", "\\frac13", False),
    ("12", "120", False),
    ("5.01", "5", False),
    ("(3,\\frac{\\pi}{3})", "\\left(3,\\frac{\\pi}{2}\\right)", False),
    ("-5", "5", False),
    ("\\frac{1}{2}x", "\\frac{1}{2}", False),
    ("1,2", "12", False),
    ("x^2", "x^3", False),
    ("\\sqrt{2}", "2", False),
    ("", "0", False),
    (None, "5", False),
]

# (model text, GSM8K reference solution, must match)
GSM8K_CASES = [
    ("She makes 9 * 2 = $18 every day.", "9 * 2 = 18\n#### 18", True),
    ("The answer is 1,200.", "#### 1200", True),
    ("It costs 3.50 dollars", "#### 3.5", True),
    ("It is -4 degrees", "#### -4", True),
    ("So 1000 in total", "#### 1,000", True),
    ("#### 42", "#### 42", True),
    ("18 eggs, then 20", "#### 18", False),
    ("no number here", "#### 18", False),
    ("The total is 18.", "#### 180", False),
    ("1,2,3", "#### 123", False),
]


class Extraction(unittest.TestCase):
    def test_table(self):
        for text, expected in EXTRACTION:
            with self.subTest(text=text):
                self.assertEqual(answers.last_boxed(text), expected)


class MathEquality(unittest.TestCase):
    def test_table(self):
        self.assertGreaterEqual(len(EXTRACTION) + len(MATH_CASES) + len(GSM8K_CASES), 30)
        for predicted, reference, match in MATH_CASES:
            with self.subTest(predicted=predicted, reference=reference):
                self.assertIs(answers.math_equal(predicted, reference), match)

    def test_boxed_then_compared(self):
        text = "We get $x = \\dfrac{14}{3}$, so the answer is $\\boxed{\\dfrac{14}{3}}$."
        self.assertTrue(answers.math_equal(answers.last_boxed(text), "\\frac{14}{3}"))
        self.assertFalse(answers.math_equal(answers.last_boxed("so x = 14/3"), "\\frac{14}{3}"))

    def test_normal_forms(self):
        self.assertEqual(answers.normalize_math("\\left( 3, \\dfrac{\\pi}{2} \\right)"), "(3,\\frac{\\pi}{2})")
        self.assertEqual(answers.normalize_math("\\text{ cm } 5"), "cm5")
        self.assertEqual(answers.parse_number("-\\frac{3}{4}"), Fraction(-3, 4))
        self.assertEqual(answers.parse_number("12,345.5"), Fraction(24691, 2))
        self.assertIsNone(answers.parse_number("1/0"))
        self.assertIsNone(answers.parse_number("\\pi"))

    def test_every_math500_and_aime24_answer_matches_itself_boxed(self):
        for path, field in (("math500/test.jsonl", "answer"), ("aime24/test.jsonl", "answer")):
            full = os.path.join(support.SHARED_DATA, path)
            self.assertTrue(os.path.isfile(full), f"{full} missing (the shared data beside the checkout)")
            with open(full) as lines:
                for line in lines:
                    gold = str(json.loads(line)[field])
                    with self.subTest(path=path, gold=gold):
                        self.assertTrue(answers.math_equal(answers.last_boxed(f"so \\boxed{{{gold}}}."), gold))


class Gsm8k(unittest.TestCase):
    def test_table(self):
        for text, solution, match in GSM8K_CASES:
            with self.subTest(text=text, solution=solution):
                predicted = answers.last_number(text)
                self.assertIs(predicted is not None
                              and answers.parse_number(predicted) == answers.gsm8k_reference_answer(solution), match)

    def test_last_number_as_written(self):
        self.assertEqual(answers.last_number("pay $1,200.50, not 3"), "3")
        self.assertEqual(answers.last_number("pay $1,200.50."), "1,200.50")
        self.assertEqual(answers.parse_number("1,200.50"), Fraction(2401, 2))
        self.assertIsNone(answers.last_number("none at all"))

    def test_reference_without_marker_is_an_error(self):
        with self.assertRaisesRegex(ValueError, "no '####' in the reference answer 'The answer is 5'"):
            answers.gsm8k_reference_answer("The answer is 5")
        with self.assertRaisesRegex(ValueError, "the text after '####' is not a number: 'five'"):
            answers.gsm8k_reference_answer("#### five")

    def test_every_gsm8k_reference_has_a_number(self):
        full = os.path.join(support.SHARED_DATA, "gsm8k/test.jsonl")
        self.assertTrue(os.path.isfile(full), f"{full} missing (the shared data beside the checkout)")
        with open(full) as lines:
            solutions = [json.loads(line)["answer"] for line in lines]
        self.assertEqual(len(solutions), 1319)
        self.assertEqual(answers.gsm8k_reference_answer(solutions[0]), 18)
        for solution in solutions:
            self.assertIsInstance(answers.gsm8k_reference_answer(solution), Fraction)


if __name__ == "__main__":
    unittest.main()
