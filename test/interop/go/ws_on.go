//go:build ts_debug_websockets

package main

// derphttp compiles its WebSocket dialer in only with this build tag
// (on linux/darwin); see tailscale.com/derp/derphttp/websocket.go.
const websocketCompiled = true
