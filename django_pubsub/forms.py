"""Forms of the operators' actions that need more than a selection."""

from __future__ import annotations

from typing import Any

from django import forms


class SeekForm(forms.Form):
    offset = forms.IntegerField(
        required=False, min_value=0, help_text="An offset in the topic: deliver from it on."
    )
    at = forms.DateTimeField(
        required=False,
        label="or a time",
        help_text="Deliver from the first message published at or after it (YYYY-MM-DD HH:MM).",
    )

    last = forms.IntegerField(
        required=False,
        min_value=0,
        label="or the last messages",
        help_text="How many of the topic's latest messages to deliver again.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:  # a field that did not parse says so itself
            return data
        if sum(data.get(name) is not None for name in ("offset", "at", "last")) != 1:
            raise forms.ValidationError(
                "Give an offset, a time or a number of last messages, one of them."
            )
        return data
