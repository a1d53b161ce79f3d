//! Element types and reduction operators.

use half::{bf16, f16};

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DataType {
    /// Signed 8-bit integer.
    I8 = 0,
    /// Unsigned 8-bit integer.
    U8 = 1,
    /// Signed 32-bit integer.
    I32 = 2,
    /// Unsigned 32-bit integer.
    U32 = 3,
    /// Signed 64-bit integer.
    I64 = 4,
    /// Unsigned 64-bit integer.
    U64 = 5,
    /// IEEE half precision.
    F16 = 6,
    /// bfloat16.
    BF16 = 7,
    /// IEEE single precision.
    F32 = 8,
    /// IEEE double precision.
    F64 = 9,
    /// Signed 16-bit integer (code 10: appended, so the codes above never change).
    I16 = 10,
}

impl DataType {
    /// Every data type, in code order.
    pub const ALL: [DataType; 11] = [
        DataType::I8,
        DataType::U8,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
        DataType::F16,
        DataType::BF16,
        DataType::F32,
        DataType::F64,
        DataType::I16,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 => 1,
            DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }

    /// Short lower-case name as used by nccl-tests and `braid-perf -d` ("float" is accepted too).
    pub fn name(self) -> &'static str {
        match self {
            DataType::I8 => "int8",
            DataType::U8 => "uint8",
            DataType::I32 => "int32",
            DataType::U32 => "uint32",
            DataType::I64 => "int64",
            DataType::U64 => "uint64",
            DataType::F16 => "half",
            DataType::BF16 => "bfloat16",
            DataType::F32 => "float",
            DataType::F64 => "double",
            DataType::I16 => "int16",
        }
    }

    /// Parses a name: nccl-tests names (`float`, `half`, `int32`, ...) or Rust ones (`f32`, `i8`, ...).
    pub fn parse(s: &str) -> Option<DataType> {
        let s = s.to_ascii_lowercase();
        Some(match s.as_str() {
            "int8" | "i8" | "char" => DataType::I8,
            "uint8" | "u8" => DataType::U8,
            "int16" | "i16" | "short" => DataType::I16,
            "int32" | "i32" | "int" => DataType::I32,
            "uint32" | "u32" => DataType::U32,
            "int64" | "i64" => DataType::I64,
            "uint64" | "u64" => DataType::U64,
            "half" | "f16" | "float16" => DataType::F16,
            "bfloat16" | "bf16" => DataType::BF16,
            "float" | "f32" | "float32" => DataType::F32,
            "double" | "f64" | "float64" => DataType::F64,
            _ => return None,
        })
    }

    /// Decodes the wire code.
    pub fn from_code(c: u8) -> Option<DataType> {
        DataType::ALL.get(c as usize).copied()
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64
        )
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reduction operator.
///
/// The bitwise operators ([`ReduceOp::Band`], [`ReduceOp::Bor`], [`ReduceOp::Bxor`]) apply to
/// integer types only; [`ReduceOp::supports`] says which combinations are valid, and
/// collectives refuse the others with [`crate::Error::InvalidArgument`] before anything is
/// sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum.
    Sum = 0,
    /// Product.
    Prod = 1,
    /// Minimum.
    Min = 2,
    /// Maximum.
    Max = 3,
    /// Average: sum divided by the number of ranks (integer division for integer types).
    Avg = 4,
    /// Bitwise AND (integer types only).
    Band = 5,
    /// Bitwise OR (integer types only).
    Bor = 6,
    /// Bitwise exclusive OR (integer types only).
    Bxor = 7,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 8] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
        ReduceOp::Band,
        ReduceOp::Bor,
        ReduceOp::Bxor,
    ];

    /// Name as nccl-tests prints it.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
            ReduceOp::Band => "band",
            ReduceOp::Bor => "bor",
            ReduceOp::Bxor => "bxor",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<ReduceOp> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" => ReduceOp::Prod,
            "min" => ReduceOp::Min,
            "max" => ReduceOp::Max,
            "avg" | "mean" => ReduceOp::Avg,
            "band" => ReduceOp::Band,
            "bor" => ReduceOp::Bor,
            "bxor" => ReduceOp::Bxor,
            _ => return None,
        })
    }

    /// Decodes the wire code.
    pub fn from_code(c: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.get(c as usize).copied()
    }

    /// Whether this is a bitwise operator (`Band`, `Bor`, `Bxor`).
    pub fn is_bitwise(self) -> bool {
        matches!(self, ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor)
    }

    /// Whether this operator can reduce elements of `dtype`: every operator applies to integer
    /// types; the bitwise ones do not apply to floating-point types.
    pub fn supports(self, dtype: DataType) -> bool {
        !(self.is_bitwise() && dtype.is_float())
    }

    /// [`ReduceOp::supports`] as a result.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] naming the operator and the data type when
    /// the combination is not supported (a bitwise operator on a floating-point type).
    pub fn check(self, dtype: DataType) -> crate::error::Result<()> {
        if self.supports(dtype) {
            Ok(())
        } else {
            Err(crate::error::Error::InvalidArgument(format!(
                "reduction operator {self} is not defined for datatype {dtype} (bitwise \
                 operators need an integer datatype)"
            )))
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that braid can move and reduce. Implemented for i8 u8 i16 i32 u32 i64 u64 f16
/// bf16 f32 f64; sealed because buffers are reinterpreted as bytes (every implementor is plain old
/// data: no padding, every bit pattern valid).
pub trait Element: sealed::Sealed + bytemuck::Pod + Send + Sync + Default {
    /// The matching [`DataType`].
    const DTYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DataType = DataType::$d; }
    )*};
}
element!(i8 => I8, u8 => U8, i16 => I16, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
         f16 => F16, bf16 => BF16, f32 => F32, f64 => F64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.name()), Some(d));
            assert_eq!(DataType::from_code(d as u8), Some(d));
        }
        for o in ReduceOp::ALL {
            assert_eq!(ReduceOp::parse(o.name()), Some(o));
            assert_eq!(ReduceOp::from_code(o as u8), Some(o));
        }
        assert_eq!(DataType::parse("f32"), Some(DataType::F32));
        assert_eq!(DataType::parse("nope"), None);
        assert_eq!(DataType::parse("short"), Some(DataType::I16));
        assert_eq!(DataType::parse("i16"), Some(DataType::I16));
        assert_eq!(DataType::I16.size(), 2);
        assert!(!DataType::I16.is_float());
    }

    #[test]
    fn wire_codes_are_stable() {
        // Codes are on the wire and in the C ABI: appended only, never renumbered.
        let dt: Vec<(DataType, u8)> = DataType::ALL.iter().map(|&d| (d, d as u8)).collect();
        assert_eq!(
            dt,
            [
                (DataType::I8, 0),
                (DataType::U8, 1),
                (DataType::I32, 2),
                (DataType::U32, 3),
                (DataType::I64, 4),
                (DataType::U64, 5),
                (DataType::F16, 6),
                (DataType::BF16, 7),
                (DataType::F32, 8),
                (DataType::F64, 9),
                (DataType::I16, 10),
            ]
        );
        let ops: Vec<u8> = ReduceOp::ALL.iter().map(|&o| o as u8).collect();
        assert_eq!(ops, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(ReduceOp::parse("BXOR"), Some(ReduceOp::Bxor));
        assert_eq!(DataType::from_code(11), None);
        assert_eq!(ReduceOp::from_code(8), None);
    }

    #[test]
    fn bitwise_ops_need_integers() {
        for d in DataType::ALL {
            for o in ReduceOp::ALL {
                let ok = !(o.is_bitwise() && d.is_float());
                assert_eq!(o.supports(d), ok, "{o} {d}");
                match o.check(d) {
                    Ok(()) => assert!(ok),
                    Err(crate::error::Error::InvalidArgument(m)) => {
                        assert!(!ok);
                        assert!(m.contains(o.name()) && m.contains(d.name()), "{m}");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}
