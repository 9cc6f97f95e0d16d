"""One transcription request: a recording or segment sent to the chat route as input_audio, or uploaded
to the transcriptions route."""

from __future__ import annotations

import base64
from typing import Any

from openai.types.audio import Transcription

from tasks.engine.job import Reply, RowFailure, unexpected_reply
from tasks.jobs.caption import reply_text
from tasks.jobs.chat import create_chat
from tasks.jobs.transcript_segments import TranscriptResult
from tasks.provider.client import Connection


async def send_chat(
    conn: Connection, model: str, prompt: str | None, where: str, data: bytes, fmt: str, *, segment: bool
) -> Reply:
    """One recording or segment sent as input_audio in a chat request; its transcript is the reply's text."""
    audio = {"data": base64.b64encode(data).decode(), "format": fmt}
    answer = await create_chat(
        conn,
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "input_audio", "input_audio": audio},
                ],
            }
        ],
    )
    response = answer.completion
    text = reply_text(response)
    result: Any
    reason = response.choices[0].finish_reason
    if text or (segment and reason == "stop"):
        # A segment of a recording may hold no speech (music, a pause above the silence level):
        # an empty answer that ended normally is its transcript.
        result = TranscriptResult(transcript=text or "", duration_s=None)
    else:
        message = f"the model returned no transcript for {where} (finish_reason={reason})"
        result = RowFailure("empty_reply", message)
    return answer.reply(result)


async def send_transcriptions(
    conn: Connection, model: str, prompt: str | None, where: str, filename: str, data: bytes
) -> Reply:
    """One recording or segment uploaded to the transcriptions route (Whisper's)."""
    # The server reads the format from the file name: name it by what the bytes are.
    extra = {"prompt": prompt} if prompt else {}
    response = await conn.client.audio.transcriptions.create(model=model, file=(filename, data), **extra)
    if not isinstance(response, Transcription):
        raise unexpected_reply(response, "a transcription")
    text = response.text.strip() if response.text else ""
    result: Any = TranscriptResult(transcript=text, duration_s=None)
    if not text:
        result = RowFailure("empty_reply", f"the server returned an empty transcript for {where}")
    # This route reports no token usage (Whisper bills by the minute): none is recorded.
    return Reply(results=[result])
