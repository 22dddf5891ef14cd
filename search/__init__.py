"""A search: the plan, Ray Tune and Optuna, the budget-aware rungs, the confirmation of the winner and its export.
Imports trainable/, results/ and base/."""
