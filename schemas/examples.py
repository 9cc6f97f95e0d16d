"""Example extraction models for `gembatch extract --schema schemas.examples:Invoice` (or :CalendarEvent);
Invoice, Receipt and Contract together for triage (`--via tools` with three --schema).

Every field is required (optional ones are ``X | None`` without a default) and extra keys are
forbidden, so ``model_json_schema()`` is also valid for OpenAI's strict structured outputs.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CalendarEvent", "Contract", "Currency", "Invoice", "LineItem", "Participant", "Receipt", "ReceiptItem"]


class Currency(StrEnum):
    USD = "USD"
    EUR = "EUR"
    GBP = "GBP"
    CHF = "CHF"
    JPY = "JPY"
    CAD = "CAD"


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What was sold, as written on the invoice.")
    quantity: int = Field(ge=0, description="Units billed.")
    unit_price: Decimal = Field(ge=0, max_digits=12, decimal_places=2, description="Price of one unit.")
    sku: str | None = Field(description="Article or SKU number, if given.")


class Invoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    invoice_number: str = Field(description="The invoice's number or reference.")
    vendor: str = Field(description="Who issued the invoice.")
    customer: str | None = Field(description="Who is billed, if named.")
    invoice_date: dt.date = Field(description="Date the invoice was issued.")
    due_date: dt.date | None = Field(description="Date payment is due, if stated.")
    currency: Currency
    line_items: list[LineItem]
    total: Decimal = Field(ge=0, max_digits=14, decimal_places=2, description="Amount due, taxes included.")


class Participant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    email: str | None = Field(description="Email address, if given.")
    role: Literal["organizer", "speaker", "attendee"]


class CalendarEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    start: dt.datetime = Field(description="Start time, ISO 8601 with the UTC offset the text implies.")
    end: dt.datetime | None = Field(description="End time, if stated.")
    all_day: bool
    location: str | None = Field(description="Venue, address or meeting link, if given.")
    participants: list[Participant]


class ReceiptItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The item as printed on the receipt.")
    price: Decimal = Field(ge=0, max_digits=12, decimal_places=2, description="What was paid for it.")


class Receipt(BaseModel):
    """A till receipt: what was bought, where, when and how it was paid."""

    model_config = ConfigDict(extra="forbid")

    merchant: str = Field(description="The shop or restaurant.")
    purchase_date: dt.date = Field(description="Date of the purchase.")
    items: list[ReceiptItem]
    total: Decimal = Field(ge=0, max_digits=14, decimal_places=2, description="Amount paid.")
    payment_method: Literal["cash", "card", "other"]


class Contract(BaseModel):
    """An agreement between parties: who, what, from when and for how long."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(description="The agreement's title or subject.")
    parties: list[str] = Field(description="Everyone who signs it.")
    effective_date: dt.date = Field(description="Date it takes effect.")
    term_months: int | None = Field(ge=1, description="Its length in months, if stated.")
    governing_law: str | None = Field(description="Jurisdiction whose law governs it, if stated.")
