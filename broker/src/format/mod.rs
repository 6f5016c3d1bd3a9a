//! Storage formats: the table of formats and features (`table`), the data
//! directory's header (`header`), and the protobuf encodings of what is
//! stored and sent from format 1 on (`storage`).

pub mod header;
pub mod hold;
pub mod storage;
pub mod table;
