export function st_init() {}
export function st_heartbeat() {}
export function st_exit() {}
