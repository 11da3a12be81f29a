"""A module that a child forked ahead imports by path and loads a handler of, before its
execution is known (see ``bootstrap._rehearse_import``): the first run of the import system
and of the handler loader in that child is had there, not on the execution's path. It has
no effect; none of it runs."""


async def handler(ctx: object, input: object) -> object:
    return input
