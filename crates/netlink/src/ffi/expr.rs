//! nf_tables expressions as libnftnl objects, built from [`RawExpr`]s for a rule.
//!
//! Invariant: an expression object is owned by one [`ExprObj`] until a rule takes it.

use super::*;

/// An expression owned until it is added to a rule.
pub(super) struct ExprObj(NonNull<sys::nftnl_expr>);

impl ExprObj {
    /// Hands the expression over (to a rule, which frees it).
    pub(super) fn into_raw(self) -> *mut sys::nftnl_expr {
        let ptr = self.0.as_ptr();
        std::mem::forget(self);
        ptr
    }

    fn u32(&self, attr: u32, value: u32) {
        // SAFETY: the expression is live; libnftnl validates the attribute id.
        unsafe { sys::nftnl_expr_set_u32(self.0.as_ptr(), attr as u16, value) }
    }

    fn u64(&self, attr: u32, value: u64) {
        // SAFETY: the expression is live; libnftnl validates the attribute id.
        unsafe { sys::nftnl_expr_set_u64(self.0.as_ptr(), attr as u16, value) }
    }

    fn data(&self, attr: u32, value: &[u8]) {
        // SAFETY: the expression is live; `value` outlives the call and is copied.
        unsafe {
            sys::nftnl_expr_set(
                self.0.as_ptr(),
                attr as u16,
                value.as_ptr().cast(),
                value.len() as u32,
            )
        };
    }

    fn str(&self, attr: u32, value: &str) -> Result<(), Error> {
        let value = cstring(value)?;
        // SAFETY: the expression is live; `value` outlives the call and is copied.
        unsafe { sys::nftnl_expr_set_str(self.0.as_ptr(), attr as u16, value.as_ptr()) };
        Ok(())
    }
}

impl Drop for ExprObj {
    fn drop(&mut self) {
        // SAFETY: an expression not handed to a rule is still owned here.
        unsafe { sys::nftnl_expr_free(self.0.as_ptr()) }
    }
}

pub(super) fn build_expr(raw: &RawExpr) -> Result<ExprObj, Error> {
    let name = match raw {
        RawExpr::Payload { .. } => "payload",
        RawExpr::MetaLoad { .. } | RawExpr::MetaSet { .. } => "meta",
        RawExpr::Ct { .. } => "ct",
        RawExpr::Bitwise { .. } => "bitwise",
        RawExpr::Cmp { .. } => "cmp",
        RawExpr::Lookup { .. } => "lookup",
        RawExpr::Immediate { .. } | RawExpr::Verdict(_) => "immediate",
        RawExpr::Numgen { .. } => "numgen",
        RawExpr::Fib { .. } => "fib",
        RawExpr::DynsetUpdate { .. } => "dynset",
        RawExpr::Dnat { .. } => "nat",
        RawExpr::Masq { .. } => "masq",
        RawExpr::Reject { .. } => "reject",
        RawExpr::Counter { .. } => "counter",
    };
    let cname = cstring(name)?;
    // SAFETY: `cname` is a valid NUL-terminated expression name.
    let ptr = unsafe { sys::nftnl_expr_alloc(cname.as_ptr()) };
    let expr = ExprObj(
        NonNull::new(ptr)
            .ok_or_else(|| Error::Encode(format!("libnftnl has no expression {name}")))?,
    );
    match raw {
        RawExpr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_BASE, *base as u32);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
        }
        RawExpr::MetaLoad { key, dreg } => {
            expr.u32(sys::NFTNL_EXPR_META_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_META_DREG, *dreg);
        }
        RawExpr::MetaSet { key, sreg } => {
            expr.u32(sys::NFTNL_EXPR_META_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_META_SREG, *sreg);
        }
        RawExpr::Ct { key, dreg } => {
            expr.u32(sys::NFTNL_EXPR_CT_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_CT_DREG, *dreg);
        }
        RawExpr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => {
            expr.u32(sys::NFTNL_EXPR_BITWISE_SREG, *sreg);
            expr.u32(sys::NFTNL_EXPR_BITWISE_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
            expr.data(sys::NFTNL_EXPR_BITWISE_MASK, mask);
            expr.data(sys::NFTNL_EXPR_BITWISE_XOR, xor);
        }
        RawExpr::Cmp { sreg, neq, data } => {
            expr.u32(sys::NFTNL_EXPR_CMP_SREG, *sreg);
            expr.u32(
                sys::NFTNL_EXPR_CMP_OP,
                if *neq {
                    libc::NFT_CMP_NEQ
                } else {
                    libc::NFT_CMP_EQ
                } as u32,
            );
            expr.data(sys::NFTNL_EXPR_CMP_DATA, data);
        }
        RawExpr::Lookup { sreg, set, dreg } => {
            expr.u32(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
            expr.str(sys::NFTNL_EXPR_LOOKUP_SET, set)?;
            if let Some(dreg) = dreg {
                expr.u32(sys::NFTNL_EXPR_LOOKUP_DREG, *dreg);
            }
        }
        RawExpr::Immediate { dreg, data } => {
            expr.u32(sys::NFTNL_EXPR_IMM_DREG, *dreg);
            expr.data(sys::NFTNL_EXPR_IMM_DATA, data);
        }
        RawExpr::Verdict(verdict) => {
            expr.u32(sys::NFTNL_EXPR_IMM_DREG, lower::REG_VERDICT);
            expr.u32(sys::NFTNL_EXPR_IMM_VERDICT, verdict_code(verdict) as u32);
            if let Some(chain) = verdict.target() {
                expr.str(sys::NFTNL_EXPR_IMM_CHAIN, chain)?;
            }
        }
        RawExpr::Numgen {
            dreg,
            modulus,
            offset,
        } => {
            expr.u32(sys::NFTNL_EXPR_NG_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_NG_MODULUS, *modulus);
            if *offset != 0 {
                expr.u32(sys::NFTNL_EXPR_NG_OFFSET, *offset);
            }
            expr.u32(sys::NFTNL_EXPR_NG_TYPE, libc::NFT_NG_RANDOM as u32);
        }
        RawExpr::Fib {
            flags,
            result,
            dreg,
        } => {
            expr.u32(sys::NFTNL_EXPR_FIB_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_FIB_RESULT, *result);
            expr.u32(sys::NFTNL_EXPR_FIB_FLAGS, *flags);
        }
        RawExpr::DynsetUpdate { sreg_key, set } => {
            expr.u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, *sreg_key);
            expr.u32(sys::NFTNL_EXPR_DYNSET_OP, libc::NFT_DYNSET_OP_UPDATE as u32);
            expr.str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set)?;
        }
        RawExpr::Dnat {
            family,
            reg_addr,
            reg_proto,
            flags,
        } => {
            expr.u32(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
            expr.u32(sys::NFTNL_EXPR_NAT_FAMILY, *family);
            expr.u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, *reg_addr);
            expr.u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, *reg_proto);
            // nft leaves the attribute out when there are no flags.
            if *flags != 0 {
                expr.u32(sys::NFTNL_EXPR_NAT_FLAGS, *flags);
            }
        }
        RawExpr::Masq { flags } => expr.u32(sys::NFTNL_EXPR_MASQ_FLAGS, *flags),
        RawExpr::Reject { kind, code } => {
            expr.u32(sys::NFTNL_EXPR_REJECT_TYPE, *kind);
            // SAFETY: the expression is live.
            unsafe {
                sys::nftnl_expr_set_u8(expr.0.as_ptr(), sys::NFTNL_EXPR_REJECT_CODE as u16, *code)
            };
        }
        RawExpr::Counter { packets, bytes } => {
            expr.u64(sys::NFTNL_EXPR_CTR_PACKETS, *packets);
            expr.u64(sys::NFTNL_EXPR_CTR_BYTES, *bytes);
        }
    }
    Ok(expr)
}
