"""The bridge: agents ask to run pre-declared commands; corral checks, sandboxes and audits them.

Nothing here is imported by `corral run`. Front ends (HTTP, spool, MCP, the CLI) only call
`corral.bridge.service.Bridge`; validation, approvals and running live in the core modules:

    declarations  bridge.commands from the settings files -> Command / Param
    binding       a request's arguments -> Invocation (argv, cwd, policy, limits)
    approvals     pending requests and decisions as files, shared by every process
    jobs          invocations run in sandboxes on a bounded pool of worker threads
    service       Bridge: the one facade
    tools         tool schemas for the Anthropic, OpenAI and MCP APIs
"""
