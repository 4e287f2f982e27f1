"""dicomnode.dispatch: the outbox of result objects, C-STORE sending, retries."""

from dicomnode.dispatch.dispatcher import Dispatcher, PassResult

__all__ = ["Dispatcher", "PassResult"]
