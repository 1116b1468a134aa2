// A do-nothing ES module strategy for the loader tests.
export function st_init() {}
export function st_heartbeat() {}
export function st_exit() {}
