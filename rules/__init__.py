"""Pure alarm logic: the rule model, the evaluator, exam phases and the default rule pack."""
