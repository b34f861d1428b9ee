// ES module entry of msgd.js: import { connect } from "/msgd.mjs";
import "./msgd.js";

const msgd = globalThis.msgd;
export const connect = msgd.connect;
export const Client = msgd.Client;
export const RpcError = msgd.RpcError;
export default msgd;
