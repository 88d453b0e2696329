"""Answers built on solving: explanations of failed solves, plan tables, fleets."""
